"""The plugin's own behaviour, through pytester (real pytest runs in a temp dir)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]


def test_markers_are_registered_with_signatures(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.cpr(mode='cpr-transfer'):*",
                                 "@pytest.mark.cpr_thresholds(*",
                                 "@pytest.mark.vfio(role='nic', backend=None, count=1):*"])


def test_fixtures_are_documented(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--fixtures")
    for name in ("cpr_vm ", "cpr_vm_factory", "cpr_settings", "cpr_artifacts", "cpr_accel", "cpr_image"):
        result.stdout.fnmatch_lines([f"{name}*"])
    assert "no docstring available" not in result.stdout.str().split("fixtures defined from pytest_cpr")[-1]


def test_header_shows_settings_with_their_source(pytester: pytest.Pytester,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CPR_CPUS", "2")
    pytester.makeini("[pytest]\ncpr_memory = 1G\n")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("--cpr-accel=tcg")
    result.stdout.fnmatch_lines(["pytest-cpr settings:", "*accel = 'tcg' (cli)*", "*memory = 1024 (ini)*",
                                 "*cpus = 2 (env)*", "*source QEMU: *"])
    assert result.ret == 0


def test_bad_setting_is_a_one_line_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("--cpr-memory=lots")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: setting --cpr-memory / CPR_MEMORY / ini cpr_memory from cli: "
                                 "'lots' is not a size; use a size such as 512M or 2G"])
    assert "Traceback" not in result.stderr.str()


TEST_USING_VM = """
import pytest

@pytest.mark.cpr(mode="cpr-transfer")
def test_needs_vm(cpr_vm):
    pass
"""


def test_missing_image_skips_with_the_build_command(pytester: pytest.Pytester, tmp_path) -> None:
    pytester.makepyfile(TEST_USING_VM)
    result = pytester.runpytest(f"--cpr-cache-dir={tmp_path}/empty", "-rs", "--cpr-accel=tcg")
    result.stdout.fnmatch_lines(["*SKIPPED*guest image not built*run `cpr-image build guest`*"])
    result.assert_outcomes(skipped=1)


def test_strict_turns_host_skips_into_failures(pytester: pytest.Pytester, tmp_path) -> None:
    pytester.makepyfile(TEST_USING_VM)
    result = pytester.runpytest(f"--cpr-cache-dir={tmp_path}/empty", "--cpr-strict=on", "--cpr-accel=tcg")
    result.stdout.fnmatch_lines(["*?cpr-strict? guest image not built*"])
    result.assert_outcomes(errors=1)


def test_unknown_mode_marker_skips_with_build_and_version(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
import pytest

@pytest.mark.cpr(mode="cpr-exec")
def test_exec(cpr_vm_factory):
    pass
""")
    result = pytester.runpytest("-rs", "--cpr-accel=tcg")
    out = result.stdout.str()
    if "guest image not built" in out:
        pytest.skip("guest image not built on this machine")
    result.stdout.fnmatch_lines(["*SKIPPED*(QEMU 10.*) lacks migration mode cpr-exec (QEMU >= 10.2)*"])


def test_an_unknown_mode_in_the_cpr_marker_is_a_usage_error_naming_the_modes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
import pytest

@pytest.mark.cpr(mode="cpr-teleport")
def test_x(cpr_vm_factory):
    pass
""")
    result = pytester.runpytest("-rs", "--cpr-accel=tcg")
    if "probing" in result.stdout.str():
        pytest.skip("no usable QEMU on this machine")
    if "guest image not built" in result.stdout.str():  # the image fixture comes first
        pytest.skip("guest image not built on this machine")
    result.stdout.fnmatch_lines(["*unknown mode 'cpr-teleport'; use one of cpr-transfer, cpr-exec*"])


def test_a_misspelt_vm_override_is_an_error(pytester: pytest.Pytester, tmp_path) -> None:
    """cpr_vm_factory(**overrides) applies them with dataclasses.replace: a typo raises, nothing boots."""
    pytester.makepyfile("""
def test_typo(cpr_vm_factory):
    cpr_vm_factory(memroy_mib=1024)
""")
    result = pytester.runpytest("--cpr-accel=tcg", f"--cpr-user-image={tmp_path}/disk.qcow2",
                                f"--cpr-cache-dir={tmp_path}/empty")
    if "probing" in result.stdout.str():
        pytest.skip("no usable QEMU on this machine")
    result.stdout.fnmatch_lines(["*TypeError*unexpected keyword argument 'memroy_mib'*"])
    result.assert_outcomes(failed=1)



def test_strict_fails_a_lacking_host_but_skips_a_negative_test_with_nothing_to_provoke() -> None:
    """--cpr-strict turns 'the host lacks X' into a failure; a host that has everything a negative test
    would need to be missing (no blocker to provoke) is no defect of the host: still a skip."""
    from pytest_cpr.fixtures import host_unavailable
    from pytest_cpr.settings import resolve

    strict = resolve({"strict": "on"}, {}, {})
    with pytest.raises(pytest.fail.Exception, match=r"\[cpr-strict\] no iommufd"):
        host_unavailable("no iommufd", strict)
    with pytest.raises(pytest.skip.Exception, match="nothing blocks"):
        host_unavailable("nothing blocks", strict, lacking=False)
    with pytest.raises(pytest.skip.Exception, match="no iommufd"):
        host_unavailable("no iommufd", resolve({}, {}, {}))
