"""Optional parts of Shoal and the pip extra that installs each: a command that needs one says so
in one line instead of failing on an import deep inside."""

from __future__ import annotations

import importlib

EXTRAS: dict[str, tuple[str, ...]] = {
    "cluster": ("ray",),  # several engine instances as Ray actors
    "sim": ("scipy", "matplotlib"),  # simulator plots, cost-model fitting, the GPU-mix planner
    "bench": ("matplotlib",),  # bench serve's plots
}


class MissingExtra(ImportError):
    """A command needs a package of an extra that is not installed."""


def require(extra: str, what: str) -> None:
    """Import the packages of ``extra``; :class:`MissingExtra` naming ``what`` needs them and the pip
    command that installs them when one is missing."""
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingExtra(f"{what} needs {module}: pip install 'shoal[{extra}]' "
                               f"(or 'shoal[all]')") from None
