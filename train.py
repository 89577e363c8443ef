"""Main job: until the Lightning entry point lands, neural network surgery on digits in a
plain PyTorch loop. ``python train.py --help`` lists the options."""

from lit_surgery.plain import main

if __name__ == "__main__":
    main()
