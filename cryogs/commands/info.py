"""Print versions, the torch build, what the extension holds (CUDA ops, cpu backend), and the GPU.

Example:
  cryogs info
"""
import platform


def add_args(parser):
    del parser


def main(args):
    import numpy
    import torch

    import cryogs
    from cryogs.render import _extension

    print(f"cryogs {cryogs.__version__}")
    print(f"python {platform.python_version()}, numpy {numpy.__version__}")
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
    print(f"torch {torch.__version__} ({build} build)")
    print(f"CUDA extension: {_extension.status()}")
    print(f"cpu backend: {_extension.cpu_status()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            print(f"GPU {i}: {prop.name}, {prop.total_memory / 2**30:.1f} GiB, {prop.multi_processor_count} SMs, "
                  f"sm_{prop.major}{prop.minor}")
    else:
        print("GPU: none visible")
