"""Train with surgery: ``python train.py fit --config configs/digits.yaml``.

LightningCLI: also ``validate``, ``test``, ``predict`` and ``--print_config``.
"""

from lit_surgery.lightning.cli import main

if __name__ == "__main__":
    main()
