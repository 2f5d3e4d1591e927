"""The strict loader: every error located at file:line:col with its field path, all errors at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.spec.loader import load_directory, load_text
from reconciler.spec.models import VirtualMachine

HEAD = "apiVersion: infinization.io/v1alpha1\nkind: VirtualMachine\n"


def errors_of(text: str) -> list[str]:
    return [str(e) for e in load_text(text, "f.yaml")[1]]


def vm_of(text: str) -> VirtualMachine:
    objects, errors = load_text(text, "f.yaml")
    assert not errors, errors
    obj = objects[0][0]
    assert isinstance(obj, VirtualMachine)
    return obj


def test_minimal_vm_gets_defaults() -> None:
    vm = vm_of(HEAD + "metadata: {name: a}\nspec: {}\n")
    assert vm.spec.runStrategy == "Always"
    assert vm.spec.machine.type == "q35" and vm.spec.machine.accel == ["kvm", "tcg"]
    assert vm.spec.memory.size == 512 * 1024**2
    assert vm.spec.restartPolicy == "Manual"


def test_unquoted_mac_stays_a_string() -> None:
    vm = vm_of(HEAD + "metadata: {name: a}\nspec:\n  networks:\n    - {name: n, mac: 52:54:00:12:34:56}\n")
    assert vm.spec.networks[0].mac == "52:54:00:12:34:56"


def test_yaml11_booleans_are_not_booleans() -> None:
    errors = errors_of(HEAD + "metadata: {name: a}\nspec:\n  runStrategy: on\n")
    assert errors == [
        "f.yaml:5:16: spec.runStrategy: Input should be 'Always', 'RerunOnFailure', 'Manual' or 'Halted' (got 'on')"
    ]


def test_duplicate_keys_are_rejected_with_both_lines() -> None:
    errors = errors_of(HEAD + "metadata: {name: a}\nspec:\n  cpu: {cores: 1}\n  cpu: {cores: 2}\n")
    assert errors == ["f.yaml:6:3: duplicate key 'cpu' (first defined on line 5)"]


def test_unknown_field_names_the_allowed_ones() -> None:
    errors = errors_of(HEAD + "metadata: {name: a}\nspec:\n  memory: {size: 1Gi, sizee: 2}\n")
    assert errors == [
        "f.yaml:5:23: spec.memory.sizee: unknown field 'sizee' (expected one of: balloon, hugepageSize, hugepages, "
            "maxSize, size, slots)"
    ]


def test_all_errors_of_a_document_at_once() -> None:
    text = HEAD + (
        "metadata: {name: Bad_Name}\n"
        "spec:\n"
        "  machine: {type: q36, accel: [tcg, hvf]}\n"
        "  disks:\n"
        "    - {name: root}\n"
        "    - {name: d2, size: 1000}\n"
    )
    errors = errors_of(text)
    assert [e.split(": ")[0] + ": " + e.split(": ")[1] for e in errors] == [
        "f.yaml:3:18: metadata.name",
        "f.yaml:5:19: spec.machine.type",
        "f.yaml:5:37: spec.machine.accel[1]",
        "f.yaml:7:7: spec.disks[0]",
        "f.yaml:8:7: spec.disks[1]",
    ]
    assert "a disk needs a size, an image, or both" in errors[3]
    assert "multiple of 512" in errors[4]


def test_missing_required_field() -> None:
    assert errors_of(HEAD + "spec: {}\n") == ["f.yaml:1:1: metadata: required field is missing"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kernel", '"/boot/vmlinuz,if=none"'),
        ("kernel", '"/boot/vm=linuz"'),
        ("kernel", '"/boot/vmlinuz\\nx"'),
        ("kernel", "relative/vmlinuz"),
        ("kernel", "/boot/../etc/shadow"),
        ("cmdline", '"console=ttyS0\\n-device foo"'),
    ],
)
def test_option_injection_and_path_escapes_are_rejected(field: str, value: str) -> None:
    boot = {"kernel": "/boot/vmlinuz", field: value}
    text = HEAD + "metadata: {name: a}\nspec:\n  boot: {" + ", ".join(f"{k}: {v}" for k, v in boot.items()) + "}\n"
    errors = errors_of(text)
    assert len(errors) == 1 and f"spec.boot.{field}" in errors[0], errors


def test_commas_are_fine_in_the_kernel_cmdline() -> None:
    vm = vm_of(HEAD + 'metadata: {name: a}\nspec:\n  boot: {kernel: /k, cmdline: "console=ttyS0,115200"}\n')
    assert vm.spec.boot is not None and vm.spec.boot.cmdline == "console=ttyS0,115200"


def test_yaml_syntax_error_is_located() -> None:
    assert errors_of("a: [1, 2\nb: 3\n")[0].startswith("f.yaml:2:")


def test_unknown_kind_and_wrong_api_version() -> None:
    assert "'Pod' is not a known kind" in errors_of("apiVersion: v1\nkind: Pod\n")[0]
    assert "apiVersion: expected 'infinization.io/v1alpha1'" in errors_of("apiVersion: v1\nkind: VirtualMachine\n")[0]


def test_directory_cross_checks(tmp_path: Path) -> None:
    nic = "    - {name: n, mac: '52:54:00:00:00:01', portForwards: [{host: 2222, guest: %d}]}\n"
    (tmp_path / "a.yaml").write_text(HEAD + "metadata: {name: a}\nspec:\n  networks:\n" + nic % 22)
    (tmp_path / "b.yaml").write_text(HEAD + "metadata: {name: a}\nspec: {}\n---\n" + HEAD +
                                     "metadata: {name: b}\nspec:\n  networks:\n" + nic % 80)
    (tmp_path / ".hidden.yaml").write_text("not: [valid")
    (tmp_path / "notes.txt").write_text("ignored")
    result = load_directory(tmp_path)
    messages = [str(e).replace(f"{tmp_path}/", "") for e in result.errors]
    # A conflict is an error in both files, at the field itself: neither definition wins by file order.
    assert "b.yaml:3:18: metadata.name: VirtualMachine 'a' is also defined at a.yaml:1" in messages
    assert "a.yaml:3:18: metadata.name: VirtualMachine 'a' is also defined at b.yaml:1" in messages
    assert ("b.yaml:11:22: spec.networks[0].mac: MAC 52:54:00:00:00:01 is also used by VirtualMachine 'a' NIC 'n' "
            "at a.yaml:1") in messages
    assert any(m.startswith("a.yaml:6:22: spec.networks[0].mac: MAC 52:54:00:00:00:01") for m in messages)
    assert any(m.startswith("b.yaml:11:65: spec.networks[0].portForwards[0].host: host port tcp/127.0.0.1:2222 "
                            "is also forwarded by VirtualMachine 'a'") for m in messages)
    assert result.failed_files == {str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")}
    assert len(result.files) == 2


def test_alias_cycles_and_bombs_are_errors_not_crashes() -> None:
    cycle = errors_of(HEAD + "metadata: {name: c}\nspec: &a {x: [*a]}\n")
    assert cycle == ["f.yaml:4:7: an alias refers to a node that contains it (a cycle)"]
    levels = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else '1'] * 10)}]\n" for i in range(6))
    assert "expands to over 100000 values" in errors_of(HEAD + "metadata: {name: d}\n" + levels)[0]


def test_a_dangling_symlink_is_an_error_not_a_removal(tmp_path: Path) -> None:
    (tmp_path / "vm.yaml").symlink_to(tmp_path / "moved-away.yaml")
    result = load_directory(tmp_path)
    assert [e.message.split(":")[0] for e in result.errors] == ["cannot read"]
    assert result.failed_files == {str(tmp_path / "vm.yaml")}


def test_derived_macs_are_stable_and_unique() -> None:
    from reconciler.spec.models import default_mac

    assert default_mac("web", "nat") == default_mac("web", "nat")
    assert default_mac("web", "nat") != default_mac("web2", "nat")
    assert default_mac("web", "nat").startswith("5a:") and len(default_mac("web", "nat")) == 17


def test_digest_ignores_formatting(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(HEAD + "metadata: {name: a}\nspec: {memory: {size: 1Gi}}\n")
    first = load_directory(tmp_path).digest()
    (tmp_path / "a.yaml").write_text("# comment\n" + HEAD + "metadata:\n  name: a\nspec:\n  memory:\n    size: 1024M\n")
    assert load_directory(tmp_path).digest() == first


def test_scoped_ipv6_addresses_cannot_smuggle_text_into_nftables() -> None:
    """Python keeps an IPv6 %zone verbatim, newlines and braces included: refused wherever an address goes."""
    zone = '"fe80::1%a } accept\\ntable ip evil { }"'
    nic = "spec:\n  networks:\n    - {name: n, type: bridge, bridge: br0, ips: [%s]}\n"
    errors = errors_of(HEAD + "metadata: {name: a}\n" + nic % zone)
    assert len(errors) == 1 and "spec.networks[0].ips[0]" in errors[0] and "scoped addresses" in errors[0]
    rule = ("spec:\n  networks:\n    - name: n\n      type: bridge\n      bridge: br0\n      firewall:\n"
            "        rules: [{direction: in, action: drop, source: %s}]\n")
    errors = errors_of(HEAD + "metadata: {name: a}\n" + rule % '"fe80::/64%x"')
    assert len(errors) == 1 and "firewall.rules[0].source" in errors[0] and "scoped addresses" in errors[0]


@pytest.mark.parametrize(("written", "cores"), [("0x2", 2), ("0o3", 3), ("04", 4), ("+2", 2)])
def test_yaml12_core_integers(written: str, cores: int) -> None:
    """Hex and ``0o`` octal are numbers, as YAML 1.2 (editors, ruamel.yaml, the JSON Schema) reads them; a
    leading zero is decimal, not YAML 1.1's octal."""
    assert vm_of(HEAD + f"metadata: {{name: a}}\nspec:\n  cpu: {{cores: {written}}}\n").spec.cpu.cores == cores


@pytest.mark.parametrize("written", [".inf", "-.Inf", ".nan"])
def test_yaml12_infinities_are_numbers_the_models_refuse(written: str) -> None:
    errors = errors_of(HEAD + f"metadata: {{name: a}}\nspec:\n  cpu: {{cores: {written}}}\n")
    assert len(errors) == 1 and "f.yaml:5:16: spec.cpu.cores" in errors[0], errors


def test_yaml12_exponent_without_a_dot_is_a_float() -> None:
    assert vm_of(HEAD + "metadata: {name: a}\nspec:\n  cpu: {cores: 2e0}\n").spec.cpu.cores == 2


def test_yaml11_only_forms_stay_strings() -> None:
    """``0b`` binary, ``1_000`` and sexagesimal are YAML 1.1 only: strings under the 1.2 core schema."""
    errors = errors_of(HEAD + "metadata: {name: a}\nspec:\n  cpu: {cores: 0b10}\n")
    assert len(errors) == 1 and "spec.cpu.cores" in errors[0]
