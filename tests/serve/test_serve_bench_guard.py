"""benchmarks/serve_bench.py stops at once, with the install command, where the server's extra is missing
(a run on a machine without fastapi or uvicorn otherwise failed only after the server process crashed)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# serve_bench.py (argv[1]) run as a script in an interpreter that finds no uvicorn
WITHOUT_UVICORN = """
import importlib.util, runpy, sys
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "uvicorn" else find_spec(name, *a)
script = sys.argv[1]
sys.argv = [script, "--variant", "tiny"]
runpy.run_path(script, run_name="__main__")
"""


def test_serve_bench_names_the_missing_extra():
    result = subprocess.run([sys.executable, "-c", WITHOUT_UVICORN, str(REPO / "benchmarks" / "serve_bench.py")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == ('serve_bench.py starts the server, which needs the serve extra: uvicorn is not '
                                     'installed: pip install -e ".[serve]"')
