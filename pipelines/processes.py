"""One process or several: the same code runs alone or under `accelerate launch` (DDP), where the main
process does the work that must happen once (data stages, records, writing models) and the others wait."""
import os
from contextlib import contextmanager


def is_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state():
    """accelerate's process state; without CUDA the processes form a CPU (gloo) group, as the Trainer's do."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    return not is_distributed() or process_state().is_main_process


def barrier() -> None:
    if is_distributed():
        process_state().wait_for_everyone()


@contextmanager
def main_process_first():
    """The main process runs the block first (e.g. a download into a shared cache), the others after it."""
    if is_distributed():
        with process_state().main_process_first():
            yield
    else:
        yield
