"""Force-matching training of SchNet / PaiNN on MM-labelled water (``fastff.train``).

Single process::

    python examples/train.py --model schnet --epochs 20 --out runs/schnet

Data-parallel on 2 processes (gloo on CPU, nccl on CUDA), same options::

    torchrun --nproc_per_node=2 --master_addr=127.0.0.1 --master_port=29511 \\
        examples/train.py --model schnet --epochs 20 --out runs/schnet

``--resume`` continues ``OUT/checkpoint.pt``; ``--help`` lists every option.
"""

import sys

from fastff.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
