"""The layers of the package: the core, the data tensors, the reports and the plain driver
work without Lightning; nothing in the core imports upwards."""

import subprocess
import sys

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric",
                                   "torchmetrics", "optuna", "wandb"):
            raise ImportError(f"{name} is blocked")
sys.meta_path.insert(0, Block())
"""


def test_core_data_report_and_plain_driver_import_without_lightning():
    code = BLOCK + (
        "import lit_surgery, lit_surgery.core.policy, lit_surgery.core.export\n"
        "import lit_surgery.data, lit_surgery.report.figures, lit_surgery.plain\n"
        "from lit_surgery.data import TensorBatches, digits\n"
        "from lit_surgery.plain import run\n"
        "from lit_surgery.core.settings import SurgerySettings\n"
        "best, _ = run([4], SurgerySettings(max_epochs=2, initial_epochs=1, epoch_step=1),"
        " verbose=False)\n"
        "assert best.net.topology.input_size == 64\n"
        "try:\n"
        "    lit_surgery.data.SurgeryDataModule\n"
        "except ImportError as err:\n"
        "    assert 'lightning' in str(err)\n"
        "else:\n"
        "    raise AssertionError('the DataModule imported with Lightning blocked')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
