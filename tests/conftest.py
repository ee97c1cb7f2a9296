"""Shared test set-up: offline hub, a repo-local teacher cache, and the tiny generator fixtures
(random models built from configs and saved with save_pretrained, loaded by the scripts through
the real from_pretrained path)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# digits teachers are deterministic: cache them once per checkout, not once per test
os.environ.setdefault("DD_CACHE", os.path.join(ROOT, ".cache"))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args, check=True, timeout=900):
    """Run one of the collection's scripts as a user would; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    from tiny_models import build_tiny_sd
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_dit(tmp_path_factory):
    from tiny_models import build_tiny_dit
    return build_tiny_dit(tmp_path_factory.mktemp("tiny-dit"))


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    from tiny_models import build_tiny_llava
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def digits_conv3():
    """The cached digits ConvNet-3 teacher (trained on first use)."""
    import common
    return common.digits_teacher("conv3")
