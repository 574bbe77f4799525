"""workbench: low-resource language adaptation (continual pretraining, task experts, fused merges).

`workbench.kernels` and `workbench.pipelines` are the repository's top-level folders `kernels/` and
`pipelines/`. Neither has an `__init__.py`: with the repository root on `sys.path` (`python -m pytest` or a
notebook started there), a folder without one loses to a regular package of the same name anywhere on the
path, so the checkout never shadows Hugging Face's `kernels` package, which `transformers` imports. An
installed wheel holds the two folders inside this package, where the ordinary import system finds them.
An editable install leaves them in the checkout, and setuptools' editable finder maps only folders with an
`__init__.py`: `_CheckoutFolders` maps these two.
"""
import importlib.machinery
import sys
from pathlib import Path

__version__ = "0.1.0"

_FOLDERS = ("kernels", "pipelines")


class _CheckoutFolders:
    """Finds `workbench.kernels` and `workbench.pipelines` in a checkout, beside this package's folder."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        parent, _, name = fullname.rpartition(".")
        if parent != __name__ or name not in _FOLDERS:
            return None
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)  # a namespace package
        spec.submodule_search_locations = [str(self.root / name)]
        return spec


def _map_checkout_folders() -> None:
    here = Path(__file__).resolve().parent
    if all((here / name).is_dir() for name in _FOLDERS):
        return  # an installed wheel
    root = here.parent
    if all((root / name).is_dir() for name in _FOLDERS) and not any(
            isinstance(f, _CheckoutFolders) for f in sys.meta_path):
        sys.meta_path.append(_CheckoutFolders(root))


_map_checkout_folders()
