"""Manufacture a VM's TPM state once, as libvirt does: ``swtpm_setup --tpm2 --create-ek-cert
--create-platform-cert --lock-nvram``, so the guest's TPM has its endorsement keys (RSA and ECC), their EK
certificates and a platform certificate in NV, signed by this installation's local CA (``tpm/.localca/``).

Called by ``apply.vmprocess`` right before the VM's swtpm starts. It runs confined like swtpm itself (QEMU's
user through setpriv: no capabilities, NoNewPrivs), so the state it writes is that user's and private.

Crash safety, by the record beside the state (``tpm/NAME.setup.json``, root's):
- ``done``: never made again (the state holds the guest's keys, BitLocker's among them);
- ``begun`` (a crash or a failure during the manufacture): the half-made state is emptied and made again;
- no record but a state swtpm already wrote (a VM from before manufacture existed): kept as it is, recorded
  as done; no record and no state: made.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

from reconciler.adapters import threads
from reconciler.errors import StepFailed
from reconciler.spec.host import HostConfig
from reconciler.state import files
from reconciler.state.layout import StateLayout, VMPaths

SETUP_TIMEOUT = 120.0  # ~3 s alone; RSA key generation under a loaded host takes longer
SETPRIV = "/usr/bin/setpriv"
_MADE = re.compile(r"Successfully created (?:NVRAM area (0x[0-9a-f]+) for (.+)"
                   r"|(RSA|ECC) .*EK with handle (0x[0-9a-f]+))")


def _tools(host: HostConfig) -> tuple[str, str]:
    """swtpm_setup and swtpm_localca, from the directory of the host's swtpm."""
    directory = os.path.dirname(host.swtpmBinary) or "/usr/bin"
    return os.path.join(directory, "swtpm_setup"), os.path.join(directory, "swtpm_localca")


def setup_argv(paths: VMPaths, host: HostConfig, config: str) -> list[str]:
    setup, _ = _tools(host)
    return [setup, "--tpm2", "--tpmstate", str(paths.tpm_state), "--config", config,
            "--tpm", f"{host.swtpmBinary} socket", "--create-ek-cert", "--create-platform-cert", "--lock-nvram",
            "--pcr-banks", "sha256"]


def made(log: str) -> list[str]:
    """What swtpm_setup's output says it made: EK handles and NV indexes (``"nv 0x1c00002 RSA 2048 EK
    certificate"``)."""
    found = []
    for match in _MADE.finditer(log):
        nv, what, kind, handle = match.groups()
        found.append(f"nv {nv} {what.rstrip('.')}" if nv else f"{kind} EK {handle}")
    return found


def _run(paths: VMPaths, argv: list[str], uid: int, gid: int, ca_dir: str) -> int:
    setpriv = [SETPRIV, f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--no-new-privs",
               "--inh-caps=-all", "--bounding-set=-all", "--"]
    # Its temporary certificate files go to the CA's own private folder, not a shared /tmp.
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": ca_dir, "TMPDIR": ca_dir}
    log = files.open_tpm_setup_log(paths)
    try:
        return subprocess.run([*setpriv, *argv], stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                              cwd=ca_dir, timeout=SETUP_TIMEOUT, check=False).returncode
    except subprocess.TimeoutExpired as exc:
        raise StepFailed(f"swtpm_setup did not finish in {SETUP_TIMEOUT:.0f}s") from exc
    except OSError as exc:
        raise StepFailed(f"cannot run swtpm_setup: {exc}") from exc
    finally:
        os.close(log)


async def manufacture(layout: StateLayout, paths: VMPaths, host: HostConfig, uid: int, gid: int) -> str:
    """Make the VM's TPM state once (see the module's docstring); what was done ("" when it was made before)."""
    record = files.read_tpm_setup(paths)
    if record is not None and record.get("state") == "done":
        return ""
    if record is None and files.tpm_state_has_data(paths):
        files.write_tpm_setup(paths, {"state": "done", "made": [], "note": "a state from before manufacture: kept"})
        return ""
    files.write_tpm_setup(paths, {"state": "begun", "at": time.time()})
    redone = files.clear_tpm_state(paths)
    config = files.prepare_tpm_ca(layout, uid, gid, _tools(host)[1])
    status = await threads.run(_run, paths, setup_argv(paths, host, str(config)), uid, gid,
                                     str(config.parent))
    log = files.tpm_setup_log(paths)
    if status != 0:
        tail = "; ".join(line.strip() for line in log.splitlines()[-4:] if line.strip())
        raise StepFailed(f"swtpm_setup failed (exit status {status}): {tail or 'no output'}")
    things = made(log)
    files.write_tpm_setup(paths, {"state": "done", "made": things, "at": time.time()})
    again = f" (a half-made state of {redone} files was emptied first)" if redone else ""
    return f"TPM manufactured{again}: {', '.join(things)}"
