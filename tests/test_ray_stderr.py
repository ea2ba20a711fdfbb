"""captioner.ray.init() drops Ray's per-actor 'constructor arguments in the object store' error line from stderr
(ray-project/ray#57733: every Ray Data actor pool triggers it) and passes everything else through unchanged."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("ray", reason="Ray Data is not installed: pip install -e '.[ray]'")
pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent('''
    import os, sys
    import ray
    import captioner.ray as cray
    cray.init(num_cpus=2, log_to_driver=False)
    class Same:
        def __call__(self, batch):
            return batch
    print("rows", ray.data.range(4).map_batches(Same, compute=ray.data.ActorPoolStrategy(size=1)).count(), flush=True)
    os.write(2, b"[2026-01-01 00:00:00,000 E 1 1] core_worker.cc:1: another error, kept\\n")
    os.write(2, b"[2026-01-01 00:00:00,000 E 1 1] x.cc:2: Actor A has constructor arguments in the object store "
                b"and max_restarts > 0. If ...\\n")
    sys.stderr.write("progress 50%\\r")
    sys.stderr.write("progress 100%\\n")
    print("python stderr line", file=sys.stderr)
    ray.shutdown()
''')


def test_ray_engine_stderr_has_no_restart_warning_and_keeps_everything_else(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, timeout=300, cwd=tmp_path)
    err = proc.stderr.decode()  # bytes: text mode would turn the progress bar's \r into \n
    assert proc.returncode == 0, err
    assert b"rows 4" in proc.stdout
    assert "object store and max_restarts" not in err
    assert "another error, kept" in err
    assert "progress 50%\rprogress 100%\n" in err and "python stderr line\n" in err
