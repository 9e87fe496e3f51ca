"""The generated protobuf code in layerstore/pb matches proto/ (run tools/genproto.py after editing a .proto)."""

import subprocess
import sys

from tests.conftest import ROOT


def test_generated_code_is_fresh():
    done = subprocess.run([sys.executable, "tools/genproto.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
