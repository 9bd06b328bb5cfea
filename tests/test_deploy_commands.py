"""README's deployment commands: they parse, every option they use exists in the pinned Flower's commands, the
certificate script makes a chain that verifies (and never overwrites), and the connection helper writes what flwr
reads. (benchmarks/flower_secure.py runs the same lines on loopback: A2V_LOOPBACK=1 in tests/test_flower.py.)"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="flwr is not installed (pip install -e '.[test]' or '.[flower]')")

from benchmarks.flower_secure import README, readme_commands  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "a2v_jax" / "deploy" / "make_certs.sh"
BIN = Path(sys.executable).parent
needs_tools = pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")),
                                 reason="openssl / ssh-keygen not installed")


def test_readme_commands_use_only_options_the_pinned_flower_has():
  commands = {c.role: c.line for c in readme_commands(README.read_text())}
  helps = {"superlink": [BIN / "flower-superlink", "--help"], "supernode": [BIN / "flower-supernode", "--help"],
           "register": [BIN / "flwr", "supernode", "register", "--help"], "run": [BIN / "flwr", "run", "--help"]}
  for role, args in helps.items():
    text = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, COLUMNS="200")).stdout
    used = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", re.sub(r'"[^"]*"', '""', commands[role])))
    assert used or role == "register", role
    missing = sorted(o for o in used if o not in text)
    assert not missing, f"{role}: {missing} not in `{' '.join(map(str, args[1:]))}`"
  assert "--database" in commands["superlink"] and "--enable-supernode-auth" in commands["superlink"]
  assert "--auth-supernode-private-key" in commands["supernode"] and "$((9094 + I))" in commands["supernode"]


def test_every_run_config_readme_and_the_benchmarks_give_is_declared_in_the_flower_app():
  """The SuperLink refuses a run whose run config names a key the app's pyproject does not declare ("Invalid run
  configuration"): README's run and resume lines, and secure aggregation's keys."""
  import tomllib
  from flwr.common.config import fuse_dicts, parse_config_args
  from a2v_jax.deploy import secure
  app = tomllib.loads((ROOT / "a2v_jax/deploy/flower_project/pyproject.toml").read_text())
  defaults = app["tool"]["flwr"]["app"]["config"]
  commands = {c.role: c.line for c in readme_commands(README.read_text())}
  for role in ("run", "resume"):
    value = re.search(r'--run-config "([^"]*)"', commands[role]).group(1)
    fuse_dicts(defaults, parse_config_args([value]))
  fused = fuse_dicts(defaults, parse_config_args(["secure-aggregation=true secagg-clipping-range=0.5 "
                                                  "secagg-num-shares=3 secagg-threshold=2 reply-timeout-s=90"]))
  assert fused["secagg-num-shares"] == 3 and secure.wanted(fused) and not secure.wanted(defaults)
  assert set(secure.DEFAULTS) <= set(defaults) and {"resume", "connect-timeout-s"} <= set(defaults)
  with pytest.raises(ValueError, match="not present"):
    fuse_dicts(defaults, parse_config_args(["secure-aggregatoin=true"]))


def test_readme_block_is_refused_when_a_command_is_missing_or_unknown():
  text = README.read_text()
  with pytest.raises(ValueError, match="want"):
    readme_commands(re.sub(r"\nflwr supernode register[^\n]*", "", text))
  with pytest.raises(ValueError, match="is none of"):
    readme_commands(text.replace("flwr run a2v_jax", "flwr rnu a2v_jax"))
  with pytest.raises(ValueError, match="no bash block"):
    readme_commands("nothing here")


@needs_tools
def test_make_certs_writes_a_chain_that_verifies_keys_flower_loads_and_never_overwrites(tmp_path):
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
  out = tmp_path / "certs"
  r = subprocess.run(["bash", str(SCRIPT), str(out), "lab.example.org", "2"], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  v = subprocess.run(["openssl", "verify", "-CAfile", out / "ca.crt", out / "server.pem"], capture_output=True,
                     text=True)
  assert v.returncode == 0 and ": OK" in v.stdout
  text = subprocess.run(["openssl", "x509", "-in", out / "server.pem", "-noout", "-text"], capture_output=True,
                        text=True).stdout
  assert "DNS:lab.example.org" in text and "IP Address:127.0.0.1" in text and "TLS Web Server Authentication" in text
  for i in range(2):  # what flower-supernode / flwr supernode register load
    key = load_ssh_private_key((out / f"node{i}").read_bytes(), None)
    pub = load_ssh_public_key((out / f"node{i}.pub").read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert pub.public_numbers() == key.public_key().public_numbers()
  assert (out / "ca.key").stat().st_mode & 0o077 == 0 and not (out / "node2").exists()

  before = {p.name: p.read_bytes() for p in out.iterdir()}
  again = subprocess.run(["bash", str(SCRIPT), str(out), "lab.example.org", "2"], capture_output=True, text=True)
  assert again.returncode == 2 and "refusing to replace" in again.stderr
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before
  bad = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "x"), "h", "two"], capture_output=True, text=True)
  assert bad.returncode == 2 and "NUM_NODES must be a positive integer, got 'two'" in bad.stderr
  assert not (tmp_path / "x").exists()


@needs_tools
def test_connection_writes_the_absolute_ca_path_flower_reads(tmp_path, monkeypatch):
  from flwr.cli.flower_config import read_superlink_connection
  from a2v_jax.deploy.connection import add_connection
  from a2v_jax.deploy.node import DeploymentError
  subprocess.run(["bash", str(SCRIPT), str(tmp_path / "certs"), "127.0.0.1", "1"], check=True, capture_output=True)
  monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
  monkeypatch.chdir(tmp_path)
  add_connection("lab", "127.0.0.1:9093", "certs/ca.crt")
  add_connection("plain", "127.0.0.1:9095", insecure=True)
  lab, plain = read_superlink_connection("lab"), read_superlink_connection("plain")
  assert lab.address == "127.0.0.1:9093" and lab.root_certificates == str(tmp_path / "certs" / "ca.crt")
  assert not lab.insecure and plain.insecure and plain.root_certificates is None
  for args, kw, match in [(("x", "127.0.0.1:9093", "certs/missing.crt"), {}, "no CA certificate at"),
                          (("x", "127.0.0.1:9093", "certs/node0.pub"), {}, "is not a PEM certificate"),
                          (("x", "127.0.0.1", "certs/ca.crt"), {}, "must be HOST:PORT"),
                          (("x", "127.0.0.1:9093"), {}, "give the CA certificate"),
                          (("x", "127.0.0.1:9093", "certs/ca.crt"), {"insecure": True}, "give the CA certificate")]:
    with pytest.raises(DeploymentError, match=match):
      add_connection(*args, **kw)
  assert "[superlink.x]" not in (tmp_path / "home" / "config.toml").read_text()
