"""Loading and converting bad checkpoints: one line naming the file for a truncated, empty,
foreign or malicious .pth, and a full disk during convert leaves nothing behind.

Parts that start processes or train are marked `slow`.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from msit_jax.io import pretrained
from msit_jax import errors
from msit_jax.inference import cli as upscale
from tests.conftest import assert_one_line_error, run_python, save_img


# ----------------------------------------------------------------------------

def test_pth_errors_are_one_line_naming_the_file(tmp_path, tiny_model_dir, capsys):
    torch = pytest.importorskip("torch")

    ok = tmp_path / "ok.pth"
    torch.save({"x": torch.zeros(3)}, ok)
    data = ok.read_bytes()
    cases = {}
    (tmp_path / "trunc.pth").write_bytes(data[:len(data) // 2])
    cases["trunc.pth"] = "truncated or corrupt"
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    cases["list.pth"] = "holds list"
    (tmp_path / "empty.pth").write_bytes(b"")
    cases["empty.pth"] = "empty file (0 bytes)"
    (tmp_path / "text.pth").write_text("hello, not a checkpoint\n")
    cases["text.pth"] = "not a PyTorch checkpoint (neither a zip archive nor a pickle"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps(Evil()))
    cases["evil.pth"] = "objects other than tensors"
    img = save_img(tmp_path / "in.png", 10, 10)
    for name, needle in cases.items():
        path = str(tmp_path / name)
        with pytest.raises(errors.CheckpointError) as e:
            pretrained.load(path)
        assert needle in str(e.value) and path in str(e.value) and "\n" not in str(e.value)
        from msit_jax.io import convert

        assert convert.main([path, str(tmp_path / f"conv_{name}")]) == errors.EXIT_CHECKPOINT
        assert_one_line_error(capsys.readouterr().err, needle, path)
        rc = upscale.main([img, "--checkpoint", path, "--scale", "2", "-o",
                           str(tmp_path / f"u_{name}.png"), "--noprogress"])
        assert rc == errors.EXIT_CHECKPOINT
        assert_one_line_error(capsys.readouterr().err, needle)
        assert not os.path.exists(tmp_path / f"conv_{name}")


@pytest.mark.slow
def test_disk_full_during_convert_is_one_line(tmp_path, tiny_model_dir):
    """convert under a write limit (RLIMIT_FSIZE: writes fail with EFBIG, as on a full
    disk): one line naming the destination, exit 7, the partial write removed."""
    torch = pytest.importorskip("torch")

    from msit_jax.io.torch_io import variables_to_state_dict
    from tests.test_convert import official_args

    src, cfg = tiny_model_dir
    _, v = pretrained.load(src)
    sd = {k: torch.from_numpy(np.array(a)) for k, a in variables_to_state_dict(v, cfg).items()}
    pth = str(tmp_path / "epoch-best.pth")
    torch.save({"model": {"name": "amsit", "args": official_args(cfg), "sd": sd}}, pth)
    dst = str(tmp_path / "out")

    # bash sets the limit for the child (a preexec_fn would fork this threaded process)
    p = run_python(["-c", "import runpy, sys; sys.argv = sys.argv[1:]; "
             "runpy.run_module('msit_jax.convert', run_name='__main__')", "convert", pth, dst],
            shell_prefix="ulimit -f 4 &&")
    assert p.returncode == errors.EXIT_OUTPUT, p.stderr[-3000:]
    line = assert_one_line_error(p.stderr, dst)
    assert "File too large" in line or "No space" in line
    assert len(p.stderr.strip().splitlines()) <= 3, p.stderr  # not a 919-line log
    assert not os.path.exists(dst)  # the partial write removed
    p = run_python(["-m", "msit_jax.convert", pth, dst])  # with room, the same command works
    assert p.returncode == 0, p.stderr[-3000:]
