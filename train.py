"""Train with surgery: ``python train.py fit --config configs/digits.yaml``.

The ``lit-surgery`` command under the name the LightningCLI habit expects: ``fit``,
``validate``, ``test``, ``predict`` (with ``--config``, ``--print_config``), and also ``tune``
and ``plain``; see :mod:`lit_surgery.cli`.
"""

from lit_surgery.cli import main

if __name__ == "__main__":
    main(prog="train.py")
