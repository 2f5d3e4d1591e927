"""What swtpm_setup's output says it made (pure parsing of its real output, swtpm 0.7)."""

from __future__ import annotations

from reconciler.apply.tpm_setup import made

LOG = """Starting vTPM manufacturing as infinization-qemu:infinization-qemu @ Mon 30 Nov 2026 10:16:57 PM UTC
TPM is listening on Unix socket.
Successfully created RSA 2048 EK with handle 0x81010001.
swtpm_localca: Successfully created EK certificate locally.
swtpm_localca: Successfully created platform certificate locally.
Successfully created NVRAM area 0x1c00002 for RSA 2048 EK certificate.
Successfully created NVRAM area 0x1c08000 for platform certificate.
Successfully created ECC EK with handle 0x81010016.
Successfully created NVRAM area 0x1c00016 for ECC EK certificate.
Successfully authored TPM state.
"""


def test_made_lists_the_keys_and_nv_indexes() -> None:
    assert made(LOG) == ["RSA EK 0x81010001", "nv 0x1c00002 RSA 2048 EK certificate",
                         "nv 0x1c08000 platform certificate", "ECC EK 0x81010016",
                         "nv 0x1c00016 ECC EK certificate"]
    assert made("swtpm_setup: error\n") == []
