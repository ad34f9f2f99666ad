"""The one bf16 test (``reslab.machine.bf16_native``) on the CPU flags of four machines (the three this project
has run on, and an AVX-512 CPU without BF16), what ``--amp auto`` picks from it in training, evaluation and
deployment, and the record that results carry."""

from __future__ import annotations

import json

import pytest
import torch

from reslab import device, machine
from reslab.train import runtime

_COMMON = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall "
    "nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni pclmulqdq "
    "ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand "
    "hypervisor lahf_lm abm 3dnowprefetch fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap "
    "clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 xsaves arat umip"
)
_AVX512 = "avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx512vbmi avx512_vbmi2 avx512_vnni"
# The /proc/cpuinfo "flags" of each kind (trimmed to what matters plus the usual neighbours).
MACHINES = {
    "AVX2-only EPYC (Zen 3)": f"{_COMMON} mmxext fxsr_opt cmp_legacy cr8_legacy sse4a misalignsse clzero rdpid",
    "AVX-512 Xeon without BF16 (Cascade Lake)": f"{_COMMON} {_AVX512} pku ospke md_clear flush_l1d",
    "AVX-512 BF16 EPYC (Zen 4)": f"{_COMMON} {_AVX512} avx512_bf16 avx512_bitalg avx512_vpopcntdq clzero rdpid",
    "Sapphire Rapids (AMX)": f"{_COMMON} {_AVX512} avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8 serialize",
}
NATIVE_BF16 = {"AVX-512 BF16 EPYC (Zen 4)", "Sapphire Rapids (AMX)"}


@pytest.fixture(params=sorted(MACHINES))
def cpu(request, monkeypatch):
    """This process sees the named machine's /proc/cpuinfo; oneDNN says yes to bf16 everywhere, as it does on
    any AVX-512 CPU (it emulates bf16 where the CPU lacks it): the flags must decide, not oneDNN."""
    name = request.param
    monkeypatch.setattr(machine, "_cpuinfo", lambda: {"model name": name, "flags": MACHINES[name]})
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    return name


def test_amp_auto_picks_bf16_only_where_the_cpu_runs_it_natively(cpu):
    cpu_device = torch.device("cpu")
    expected = torch.bfloat16 if cpu in NATIVE_BF16 else None
    assert machine.bf16_native(cpu_device) is (cpu in NATIVE_BF16)
    assert device.pick_amp("auto", cpu_device) is expected  # eval, predict, the run report, explain
    assert runtime.setup("cpu", "auto", channels_last=None).amp_dtype is expected  # reslab train --amp auto
    assert device.pick_amp("bf16", cpu_device) is torch.bfloat16  # asked for by name: given, wherever
    assert device.pick_amp("off", cpu_device) is None


def test_int8_native_needs_vnni_or_amx(cpu):
    assert machine.int8_native() is (cpu != "AVX2-only EPYC (Zen 3)")


@pytest.mark.parametrize("cpuinfo", [{}, {"processor": "0", "Features": "fp asimd bf16 i8mm sve"}])
def test_without_x86_flags_oneDNN_decides(monkeypatch, cpuinfo):
    """macOS and Windows have no /proc/cpuinfo, ARM Linux lists "Features": there oneDNN's answer is all there is."""
    monkeypatch.setattr(machine, "_cpuinfo", lambda: cpuinfo)
    for answer in (True, False):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda a=answer: a, raising=False)
        assert machine.bf16_native(torch.device("cpu")) is answer


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["/x/.venv/bin/reslab", "explain", "lesion"], "reslab explain lesion"),
        (["/x/src/reslab/__main__.py", "train", "--budget", "1m"], "reslab train --budget 1m"),  # python -m reslab
        (["benchmarks/demo.py"], "python benchmarks/demo.py"),
    ],
)
def test_the_recorded_command_is_what_a_user_types(monkeypatch, argv, command):
    monkeypatch.setattr("sys.argv", argv)
    assert machine.record("cpu", peak=False)["command"] == command


def test_record_names_command_commit_date_and_machine(monkeypatch):
    monkeypatch.setattr(machine, "matmul_peak", lambda *a, **k: 171.23)
    monkeypatch.setattr("sys.argv", ["benchmarks/throughput.py", "--model", "resnet50"])
    record = machine.record("cpu")
    assert record["command"] == "python benchmarks/throughput.py --model resnet50"
    assert record["date"].endswith("UTC")
    assert record["commit"] is None or len(record["commit"].removesuffix("-dirty")) == 40  # None outside git
    described = record["machine"]
    assert described["fp32_matmul_gflops"] == 171.2 and described["cores"] == machine.os.cpu_count()
    assert described["torch"] == torch.__version__ and isinstance(described["cpu_flags"], list)
    assert json.loads(json.dumps(record)) == record  # it goes into JSON files as it is
    assert machine.record("cpu", command="reslab explain all", peak=False)["machine"]["fp32_matmul_gflops"] is None
