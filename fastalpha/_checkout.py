"""A checkout's kernels/ imported as `fastalpha.kernels`, the name a wheel installs it under.

The Triton kernels live at the top of the repository beside csrc/ (as the C++ sources do), not
inside this package; a wheel maps the folder to fastalpha/kernels/ (setup.py). A checkout, run
in place or installed editable, has no fastalpha/kernels/, so importing this module (the first
thing fastalpha/__init__.py does) loads the folder beside the package under that name, before
anything imports it.
"""
import importlib.util
import sys
from pathlib import Path


def attach_kernels() -> None:
    """Register kernels/ beside the package as the subpackage fastalpha.kernels, if a checkout."""
    package = __name__.rpartition(".")[0]
    here = Path(__file__).resolve().parent
    source = here.parent / "kernels"
    name = f"{package}.kernels"
    if (here / "kernels").is_dir() or not (source / "__init__.py").is_file() or name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, source / "__init__.py",
                                                  submodule_search_locations=[str(source)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    # What `import` does for a submodule: make it an attribute of its parent package.
    setattr(sys.modules[package], "kernels", module)


attach_kernels()
