"""Options shared by several subcommands."""
import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_compute_args(parser) -> None:
    parser.add_argument("--device", default=default_device(),
                        help="torch device to compute on (default: cuda if a GPU is visible, else cpu)")
    parser.add_argument("--backend", default="auto", choices=["auto", "cuda", "torch", "dense"],
                        help="projection backend: auto picks the CUDA kernels on a GPU when built, else the "
                             "torch splat; dense is the exact (slow) reference (default: auto)")
