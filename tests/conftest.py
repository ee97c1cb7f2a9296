"""Shared test set-up: offline hub, a repo-local teacher cache, and the tiny generator fixtures
(random models built from configs and saved with save_pretrained, loaded by the scripts through
the real from_pretrained path).

No global state is set at import: the environment of a script run is passed explicitly
(`script_env`), and in-process tests get it from an autouse fixture that restores os.environ, the
hub's offline switch and torch's thread count after every test, so that results never depend on
which test module was imported or ran first.

The suite runs on two pytest-xdist workers (pyproject's addopts: `-n 2`; `-n 0` for one process). Each
worker, its in-process tests and the scripts it starts get an equal share of the cores as their thread
count: oversubscribed OpenMP threads spin-wait and make a shared 2-core box several times slower."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # set by pytest-xdist in its workers
THREADS = max(1, len(os.sched_getaffinity(0)) // WORKERS)
# what every script run and in-process test sees: an offline hub, and digits teachers cached once
# per checkout (they are deterministic), not once per test
TEST_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "DD_CACHE": os.environ.get("DD_CACHE") or os.path.join(ROOT, ".cache"),
            **({"OMP_NUM_THREADS": str(THREADS)} if WORKERS > 1 else {})}
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def unexpected_stderr(text):
    """The lines of a script's stderr that are not tqdm progress bars ("desc:  40%|████ | 4/10 [...]"): a
    successful run must print nothing else there (no third-party warning that says nothing to the user)."""
    import re
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text)]
    return [ln for ln in lines if ln and not re.match(r"^[^|]*?:?\s*\d+%\|", ln)]


def script_env(**extra):
    """The environment of a script run: the caller's, the test settings, then `extra`."""
    return {**os.environ, **TEST_ENV, **extra}


def run_script(script, *args, check=True, timeout=900, env=None):
    """Run one of the collection's scripts as a user would; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=script_env(**(env or {})))
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped, with the reason, where torch sees no CUDA device."""
    cuda_tests = [item for item in items if item.get_closest_marker("cuda")]
    if cuda_tests:
        import torch
        if not torch.cuda.is_available():
            for item in cuda_tests:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch"))


@pytest.fixture(scope="session", autouse=True)
def _worker_threads():
    """Under pytest-xdist, this worker's share of the cores as torch's thread count; restored at the end."""
    import torch
    threads = torch.get_num_threads()
    if WORKERS > 1:
        torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _test_env(monkeypatch):
    """In-process tests see TEST_ENV and an offline hub; os.environ, the hub's offline switch (read
    once when huggingface_hub is imported) and torch's thread count are restored afterwards."""
    import huggingface_hub.constants
    import torch
    for k, v in TEST_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests (on a shared 2-core box OpenMP spin-waits
    make them several times slower with 2 threads), restored when the module is done. Use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`; script runs are separate processes and
    keep their own default."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    """The cached digits ConvNet-3 teacher (trained on first use). Session fixtures are set up before the
    autouse `_test_env`, so the test settings are applied here too: the teacher lands in TEST_ENV's
    cache, where the tests and the scripts look for it, whatever $DD_CACHE the session started with."""
    import common
    with pytest.MonkeyPatch.context() as mp:
        for k, v in TEST_ENV.items():
            mp.setenv(k, v)
        return common.digits_teacher("conv3")


def randomise_bn(model, seed):
    """Seeded non-trivial BatchNorm statistics and affine parameters, so that equal logits test the norm layers too."""
    import torch
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def random_digits_set(out, ipc, seed):
    """A set in the on-disk contract: `ipc` random digits training images per class (method "random")."""
    import argparse
    import common
    x, y = common.digits_split("train")
    idx = common.random_subset(y.tolist(), ipc, seed)
    run = common.RunDir(str(out), argparse.Namespace(method="random", ipc=ipc, seed=seed), common.class_list("digits"))
    for c in range(10):
        run.write_class(c, x[idx][y[idx] == c])
    run.finish()
    return str(out)
