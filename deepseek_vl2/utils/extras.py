"""The optional extras of pyproject.toml ([project.optional-dependencies]) that entry points need:
`missing_extra` names what is not installed and the pip command that adds it, so that an entry point
can stop with that message rather than with an import traceback."""
import importlib.util
from typing import Optional

# the modules each extra installs that the package imports
EXTRA_MODULES = {
    "serve": ("fastapi", "uvicorn", "httpx"),  # serve/__main__.py, app.py, media.py
    "ray": ("ray",),  # batch/ray_stage.py
}


def missing_extra(extra: str) -> Optional[str]:
    """None where every module of `extra` is installed; else e.g. 'uvicorn is not installed: pip
    install -e ".[serve]"'."""
    missing = [name for name in EXTRA_MODULES[extra] if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    verb = "is" if len(missing) == 1 else "are"
    return f'{" and ".join(missing)} {verb} not installed: pip install -e ".[{extra}]"'
