"""Planner golden cases: desired + observed + last-applied in, rendered plan out.

Each folder under ``plan_cases/`` holds ``desired.yaml`` (manifests), ``observed.yaml`` (an ObservedState),
optionally ``records.yaml`` (last-applied records by VM name), ``options.yaml`` and ``host.yaml`` (the host
policy; ``plan_cases/host.yaml`` when a case has none), and ``expected.txt``:
the plan exactly as ``infinization plan`` prints it, followed by its steps as data. Regenerate after an
intended change with ``UPDATE_GOLDEN=1 pytest tests/unit/test_planner_golden.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from rich.text import Text

from reconciler.plan.actions import Plan
from reconciler.plan.observed import ObservedState
from reconciler.plan.planner import PlanOptions, plan
from reconciler.plan.render import render_plan
from reconciler.spec.host import HostConfig
from reconciler.spec.loader import load_text
from reconciler.spec.models import Network, VirtualMachine
from reconciler.state.models import AppliedRecord

CASES = Path(__file__).parent / "plan_cases"


def _case_plan(case: Path, only: set[str] | None = None) -> Plan:
    objects, errors = load_text((case / "desired.yaml").read_text(), "desired.yaml")
    assert not errors, errors
    desired = {obj.name: obj for obj, _ in objects if isinstance(obj, VirtualMachine)}
    networks = {obj.name: obj for obj, _ in objects if isinstance(obj, Network)}
    observed = ObservedState.model_validate(yaml.safe_load((case / "observed.yaml").read_text()))
    records_file = case / "records.yaml"
    raw_records = yaml.safe_load(records_file.read_text()) if records_file.exists() else {}
    records = {name: AppliedRecord.model_validate(data) for name, data in (raw_records or {}).items()}
    options_file = case / "options.yaml"
    options = PlanOptions(**yaml.safe_load(options_file.read_text())) if options_file.exists() else PlanOptions()
    host_file = case / "host.yaml" if (case / "host.yaml").exists() else CASES / "host.yaml"
    host = HostConfig.model_validate(yaml.safe_load(host_file.read_text()))
    return plan(desired, observed, records, networks=networks, manifest_dir="/m", desired_digest="d",
                options=options, host=host, only=only)


def _render(result: Plan) -> str:
    text = Text.from_markup(render_plan(result)).plain
    steps = [
        {"name": step.name, "kind": step.kind.value, "target": step.target,
         **{k: v for k, v in step.args.items() if k != "vm"}}
        for change in result.changes for step in change.steps
    ]
    return text + "\n--- steps\n" + "\n".join(json.dumps(step, sort_keys=True) for step in steps) + "\n"


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_golden(case: str) -> None:
    folder = CASES / case
    rendered = _render(_case_plan(folder))
    expected_file = folder / "expected.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        expected_file.write_text(rendered)
    assert rendered == expected_file.read_text()


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_deterministic_and_round_trips(case: str) -> None:
    first, second = _case_plan(CASES / case), _case_plan(CASES / case)
    assert first.model_dump_json() == second.model_dump_json()
    assert Plan.model_validate_json(first.model_dump_json()) == first


# Where planning one VM alone differs from its part of the whole plan: the hugepages VMs planned before it
# would take (the sync loop plans one VM a reconcile; the others are not being started by that plan).
ALONE_DIFFERS = {("hugepages_checked_at_plan_time", "small2")}


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_one_vm_planned_alone_is_its_part_of_the_whole_plan(case: str) -> None:
    whole = _case_plan(CASES / case)
    networks = [c for c in whole.changes if c.resource != "VirtualMachine"]
    for change in (c for c in whole.changes if c.resource == "VirtualMachine"):
        alone = _case_plan(CASES / case, only={change.name})
        assert [c for c in alone.changes if c.resource != "VirtualMachine"] == networks
        [mine] = [c for c in alone.changes if c.resource == "VirtualMachine"]
        if (case, change.name) in ALONE_DIFFERS:
            assert change.refusals and not mine.refusals and mine.steps  # nothing else takes its hugepages
        else:
            assert mine == change
    host_only = _case_plan(CASES / case, only=set())  # the sync loop's @host key: Networks and firewall only
    assert [c for c in host_only.changes if c.resource != "VirtualMachine"] == networks
    assert [c for c in host_only.changes if c.resource == "VirtualMachine"] == []


# Every row of the field table, and a golden case whose plan shows that row at work.
TABLE_COVERAGE: dict[tuple[str, ...], tuple[str, str]] = {
    ("cpu", "placement"): ("placement_changed_is_repinned_live", "~ cpu.placement: {\"cpuSet\":\"2-3\"} -> "),
    ("memory", "hugepages"): ("hugepages_checked_at_plan_time", "memory.hugepages changed (False -> True)"),
    ("memory", "hugepageSize"): ("hugepages_checked_at_plan_time", "memory.hugepageSize changed (2Mi -> 1Gi)"),
    ("runStrategy",): ("halted_stops_running_vm", "runStrategy is Halted"),
    ("paused",): ("paused_set_on_running_vm_pauses_it_live", "paused: False -> True  (live: QMP stop / cont"),
    ("restartPolicy",): ("restart_policy_auto_with_live_grow", "restartPolicy: Manual -> Auto"),
    ("terminationGracePeriodSeconds",): ("fixed_at_start_fields_and_recorded_ones",
                                         "terminationGracePeriodSeconds: 60 -> 5  (live: recorded)"),
    ("hotplugSlots",): ("restart_pending_lists_every_cause", "hotplugSlots changed (4 -> 2)"),
    ("machine", "type"): ("restart_pending_lists_every_cause", "machine.type changed (q35 -> pc)"),
    ("machine", "accel"): ("fixed_at_start_fields_and_recorded_ones", "machine.accel changed"),
    ("cpu",): ("fixed_at_start_fields_and_recorded_ones", "cpu.model changed (None -> qemu64)"),
    ("cpu", "cores"): ("cpus_and_memory_grow_live", "vCPUs: 1 -> 3 (device_add)"),
    ("cpu", "maxCpus"): ("beyond_declared_maxima_needs_restart", "cpu.maxCpus changed (4 -> 8)"),
    ("memory",): ("fixed_at_start_fields_and_recorded_ones", "memory.balloon changed (False -> True)"),
    ("memory", "size"): ("memory_shrinks_through_balloon", "balloon: 512Mi -> 384Mi"),
    ("boot",): ("restart_pending_lists_every_cause", "boot.cmdline changed"),
    ("firmware",): ("firmware_and_boot_order_change_need_restart", "firmware.type changed (bios -> uefi)"),
    ("firmware", "secureBoot"): ("firmware_and_boot_order_change_need_restart",
                                 "firmware.secureBoot changed (False -> True)"),
    ("bootOrder",): ("firmware_and_boot_order_change_need_restart", "bootOrder changed ([] -> [\"cdrom:tools\""),
    ("disks", "*"): ("disk_added_live_is_created_and_hotplugged", "disk data: hot-plug"),
    ("disks", "*", "size"): ("grow_disk_live", "disk root: grow 1Gi -> 2Gi (block_resize)"),
    ("disks", "*", "image"): ("backing_image_changed_is_refused", "a disk's image cannot change"),
    ("disks", "*", "imageFormat"): ("backing_format_changed_is_refused", "disks[root].imageFormat: qcow2 -> raw"),
    ("disks", "*", "deletePolicy"): ("delete_policy_change_is_recorded_live", "deletePolicy: Retain -> Delete"),
    ("disks", "*", "iops"): ("io_limits_change_live", "I/O limits iops=1000"),
    ("disks", "*", "bps"): ("io_limits_change_live", "bps=10485760"),
    ("networks", "*"): ("nic_added_and_link_down_live", "NIC second: hot-plug"),
    ("networks", "*", "mac"): ("restart_pending_lists_every_cause", "networks[nat].mac changed"),
    ("networks", "*", "portForwards"): ("restart_pending_lists_every_cause", "networks[nat].portForwards changed"),
    ("networks", "*", "link"): ("nic_added_and_link_down_live", "NIC nat: link down (set_link)"),
    ("cdroms", "*"): ("cdrom_media_inserted_and_drive_added_live", "CD-ROM cd1: add drive (empty)"),
    ("cdroms", "*", "image"): ("cdrom_media_inserted_and_drive_added_live", "CD-ROM cd0: insert /srv/iso/tools.iso"),
    ("metadata", "labels"): ("labels_only_update_the_record", "metadata.labels"),
    ("networks", "*", "type"): ("nic_type_change_needs_restart", "networks[nat].type changed (user -> bridge)"),
    ("networks", "*", "queues"): ("nic_queues_change_needs_restart", "networks[lan0].queues changed (1 -> 4)"),
    ("networks", "*", "network"): ("nic_moved_to_another_network_live_with_rule_diff",
                                   "is on br-lan: attach to br-dmz"),
    ("networks", "*", "bridge"): ("nic_moved_to_another_existing_bridge_live", "is on br-old: attach to br-new"),
    ("networks", "*", "firewall"): ("firewall_rules_change_live_as_rule_diffs",
                                    "web/lan0 in 1: accept tcp ports 22,80-90 from 10.77.0.0/24"),
    ("networks", "*", "ips"): ("nic_moved_to_another_network_live_with_rule_diff", "web/lan0 anti-spoofing ipv4"),
    ("networks", "*", "ipv6"): ("nic_ipv6_allowed_live_as_rule_diff", "+ rule web/lan0 anti-spoofing only ip+arp+ip6"),
    ("networks", "*", "restrict"): ("nic_restrict_change_needs_restart",
                                    "networks[nat].restrict changed (False -> True)"),
    ("disks", "*", "bus"): ("sata_disk_added_live_needs_restart_scsi_hotplugs",
                            "disks[legacy] (bus sata) added: q35's AHCI cannot hot-plug"),
    ("disks", "*", "cache"): ("device_model_changes_need_restart", "disks[root].cache changed (writeback -> none)"),
    ("disks", "*", "discard"): ("device_model_changes_need_restart", "disks[root].discard changed (ignore -> unmap)"),
    ("disks", "*", "readOnly"): ("device_model_changes_need_restart", "disks[root].readOnly changed (False -> True)"),
    ("disks", "*", "preallocation"): ("sata_disk_added_live_needs_restart_scsi_hotplugs",
                                      "disk scratch: create 2Gi qcow2 (preallocation=full)"),
    ("networks", "*", "model"): ("device_model_changes_need_restart",
                                 "networks[nat].model changed (virtio -> e1000e)"),
    ("rng",): ("device_model_changes_need_restart", "rng.enabled changed (True -> False)"),
    ("channels", "*"): ("channels_and_guest_agent_need_restart",
                        "channels[com.infinibay.service] added: virtio-serial ports are created when QEMU starts"),
    ("guestAgent",): ("channels_and_guest_agent_need_restart", "guestAgent.enabled changed (False -> True)"),
    ("tpm",): ("tpm_turned_off_keeps_state_orphan_swtpm_stopped", "turned off, the TPM state is kept"),
    ("cdroms", "*", "bootOnce"): ("install_ended_is_recorded_done_not_drift",
                                  "cdroms[cd0].bootOnce: False -> True  (live: recorded)"),
    ("cdroms", "*", "ejectAfterInstall"): ("install_ended_is_recorded_done_not_drift",
                                           "record the install from install as done; eject install"),
    ("cloudInit",): ("cloud_init_user_data_changed_live", "takes effect on the next boot; cloud-init runs it only"),
    ("display",): ("display_drift_and_input_audio_need_restart", "display.port changed (5900 -> 5901)"),
    ("display", "passwordFile"): ("display_password_rotated_live", "display password rotated: set_password (vnc)"),
    ("display", "passwordExpiresAfter"): ("display_password_rotated_live", "expire_password +3600s"),
    ("input",): ("display_drift_and_input_audio_need_restart", "input.tablet changed (None -> False)"),
    ("audio",): ("display_drift_and_input_audio_need_restart", "audio.enabled changed (False -> True)"),
    ("hostDevices", "*"): ("host_devices_hotplugged_and_given_back_live",
                           "host device mouse: hot-plug on the xHCI controller (device_add)"),
    ("hostDevices", "*", "pci"): ("host_device_options_change_needs_restart",
                                  "hostDevices[stick].pci changed (0000:07:00.0 -> 0000:08:00.0)"),
    ("hostDevices", "*", "usb"): ("host_device_options_change_needs_restart",
                                  "hostDevices[token].usb.vendor changed (0x1050 -> 0x046d)"),
    ("hostDevices", "*", "romFile"): ("host_device_options_change_needs_restart",
                                      "hostDevices[gpu].romFile changed (/usr/share/qemu/gpu.rom"),
    ("hostDevices", "*", "multifunction"): ("host_device_options_change_needs_restart",
                                            "hostDevices[gpu].multifunction changed (False -> True)"),
}


def test_user_data_never_reaches_a_plan() -> None:
    """user-data may hold passwords: plans (text and JSON) show its hash only, and read back equal."""
    result = _case_plan(CASES / "cloud_init_user_data_changed_live")
    shown = result.model_dump_json() + render_plan(result)
    assert "secret" not in shown and "<redacted sha256:" in result.model_dump_json()
    assert Plan.model_validate_json(result.model_dump_json()) == result


def test_every_field_table_row_has_a_golden_case() -> None:
    from reconciler.plan.fields import TABLE

    assert {rule.pattern for rule in TABLE} == set(TABLE_COVERAGE)
    for pattern, (case, snippet) in TABLE_COVERAGE.items():
        assert snippet in (CASES / case / "expected.txt").read_text(), (pattern, case)
