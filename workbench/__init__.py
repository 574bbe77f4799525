"""workbench: low-resource language adaptation (continual pretraining, task experts, fused merges).

`workbench.kernels` and `workbench.pipelines` are the repository's top-level folders `kernels/` and
`pipelines/`. Neither has an `__init__.py`: with the repository root on `sys.path` (`python -m pytest` or a
notebook started there), a folder without one loses to a regular package of the same name anywhere on the
path, so the checkout never shadows Hugging Face's `kernels` package, which `transformers` imports. An
installed wheel holds the two folders inside this package, where the ordinary import system finds them.
An editable install leaves them in the checkout, and setuptools' editable finder maps only folders with an
`__init__.py`: `_CheckoutFolders` maps these two. It also maps `workbench.languages` (a regular package, which
the editable finder maps) to the same checkout, so that `python -m workbench` run from a second checkout (a
git worktree) reads that checkout's language files, not those of the checkout that was installed.
"""
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

_FOLDERS = ("kernels", "pipelines")
_PACKAGES = ("languages",)  # regular packages (with an __init__.py) of the checkout


class _CheckoutFolders:
    """Finds `workbench.kernels`, `workbench.pipelines` and `workbench.languages` in a checkout, beside this
    package's folder."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        parent, _, name = fullname.rpartition(".")
        if parent != __name__ or name not in _FOLDERS + _PACKAGES:
            return None
        if name in _PACKAGES:
            init = self.root / name / "__init__.py"
            if not init.is_file():
                return None
            return importlib.util.spec_from_file_location(fullname, init,
                                                          submodule_search_locations=[str(init.parent)])
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
        sys.meta_path.insert(0, _CheckoutFolders(root))  # before the editable finder, which maps `languages`


_map_checkout_folders()
