"""The optional extras of pyproject.toml ([project.optional-dependencies]) that an entry point needs:
`missing_extra` names what is not installed and the pip command that adds it, so that the entry point
can stop with that message rather than with an import traceback."""
import importlib.util
from typing import Iterable, Optional


def missing_extra(extra: str, modules: Iterable[str]) -> Optional[str]:
    """None where every one of `modules` can be imported; else e.g. 'uvicorn is not installed: pip
    install -e ".[serve]"'."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    verb = "is" if len(missing) == 1 else "are"
    return f'{" and ".join(missing)} {verb} not installed: pip install -e ".[{extra}]"'
