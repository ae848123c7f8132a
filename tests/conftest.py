import os

import pytest
import torch

# one thread: tiny-op tests slow down badly when OpenMP threads oversubscribe busy cores
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The fused decode-step kernel modules, imported once as this process starts: @triton.jit picks compiled or
# interpreted kernels at import time, from TRITON_INTERPRET. Tests that set it (monkeypatch) only build decoders;
# the kernels run under the interpreter in subprocesses. Imported here first, the in-process modules stay the
# compiled kind, which the sm_90 compile tests need whatever order the tests run in.
if os.environ.get("TRITON_INTERPRET") != "1":
    for _mod in ("lnn_step_triton", "ssm_step_triton", "latent_step_triton", "embed_step_triton"):
        try:
            __import__(f"ionllama.kernels.{_mod}")
        except ImportError:  # no triton: those tests skip
            pass


def pytest_collection_finish(session):
    # test_kernels' interpreter children (~2 min of one core) start now, beside the suite's tests
    if session.config.option.collectonly:
        return
    for item in session.items:
        if "interpreter_results" in getattr(item, "fixturenames", ()):
            item.module.start_interpreter_children(session)
            break


def pytest_sessionfinish(session):
    for item in getattr(session, "items", ()):
        if "interpreter_results" in getattr(item, "fixturenames", ()):
            item.module.stop_interpreter_children()
            break
