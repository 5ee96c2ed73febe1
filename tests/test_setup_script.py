"""scripts/setup_env.sh (make setup) on an interpreter that cannot make virtual environments."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "setup_env.sh")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="needs a system python3")
def test_without_ensurepip_and_apt_it_prints_the_one_command_and_makes_nothing(tmp_path):
    fake = tmp_path / "python3"  # Debian's python3 without the python3-venv package
    fake.write_text('#!/bin/sh\ncase "$*" in *ensurepip*) exit 1;; esac\nexec /usr/bin/python3 "$@"\n')
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    result = subprocess.run(["sh", SCRIPT], env=dict(os.environ, PYTHON=str(fake), VENV=str(venv), APT_GET=""),
                            capture_output=True, text=True, timeout=120)
    version = subprocess.run(["/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    assert result.returncode == 1
    assert f"Run: sudo apt-get install python{version}-venv   then: make setup" in result.stderr
    assert not venv.exists()


@pytest.mark.slow
def test_a_too_old_or_missing_interpreter_is_named(tmp_path):
    result = subprocess.run(["sh", SCRIPT], env=dict(os.environ, PYTHON="no-such-python3", VENV=str(tmp_path / "v"),
                                                     APT_GET=""), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "PYTHON=no-such-python3 not found" in result.stderr
