"""Board telemetry for the edgenas agent (stdlib only; Python 3.8+).

Readers for Linux /sys (CPU frequencies, governors, thermal zones), Raspberry Pi
``vcgencmd`` and NVIDIA Jetson ``nvpmodel -q`` / ``jetson_clocks --show`` / devfreq. Each
parser is a pure function over the text the source prints, so it is tested on captured
output. A source that is not there is reported as absent (None), never invented."""

import glob
import os
import platform
import re
import shutil
import subprocess
import time


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except (OSError, IOError):
        return None


def _run(cmd, timeout=5.0):
    exe = shutil.which(cmd[0])
    if exe is None:
        return None
    try:
        out = subprocess.run([exe] + list(cmd[1:]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             timeout=timeout, universal_newlines=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


# --- board identity -----------------------------------------------------------------------
def classify_board(device_tree_model, has_tegra_release, machine):
    model = (device_tree_model or "").replace("\x00", "").strip()
    if "Raspberry Pi" in model:
        return "raspberry-pi"
    if has_tegra_release or "Jetson" in model or "NVIDIA" in model:
        return "jetson"
    if machine in ("x86_64", "AMD64", "i686", "i386"):
        return "x86"
    return "arm" if machine.startswith(("arm", "aarch")) else (machine or "unknown")


def board_info():
    model = _read("/proc/device-tree/model")
    kind = classify_board(model, os.path.exists("/etc/nv_tegra_release"), platform.machine())
    cpu_model = None
    cpuinfo = _read("/proc/cpuinfo") or ""
    for key in ("model name", "Model", "Hardware"):
        m = re.search(r"^%s\s*:\s*(.+)$" % key, cpuinfo, re.M)
        if m:
            cpu_model = m.group(1).strip()
            break
    mem_kb = None
    m = re.search(r"^MemTotal:\s+(\d+) kB", _read("/proc/meminfo") or "", re.M)
    if m:
        mem_kb = int(m.group(1))
    return {
        "kind": kind,
        "model": (model or "").replace("\x00", "").strip() or None,
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "memory_mb": mem_kb // 1024 if mem_kb else None,
        "machine": platform.machine(),
        "kernel": platform.release(),
        "tegra_release": _read("/etc/nv_tegra_release"),
    }


# --- CPU and thermal from /sys --------------------------------------------------------------
def read_cpus(root="/sys/devices/system/cpu"):
    cpus = {}
    for d in sorted(glob.glob(os.path.join(root, "cpu[0-9]*")), key=lambda p: int(re.sub(r"\D", "", os.path.basename(p)))):
        name = os.path.basename(d)
        fd = os.path.join(d, "cpufreq")
        if not os.path.isdir(fd):
            continue
        entry = {}
        for key, fname in (("cur_mhz", "scaling_cur_freq"), ("min_mhz", "scaling_min_freq"), ("max_mhz", "scaling_max_freq"),
                           ("hw_max_mhz", "cpuinfo_max_freq")):
            v = _read(os.path.join(fd, fname))
            entry[key] = int(v) / 1000.0 if v and v.isdigit() else None
        entry["governor"] = _read(os.path.join(fd, "scaling_governor"))
        cpus[name] = entry
    return cpus or None


def read_thermal(root="/sys/class/thermal"):
    zones = {}
    for d in sorted(glob.glob(os.path.join(root, "thermal_zone*"))):
        t = _read(os.path.join(d, "temp"))
        if t is None or not t.lstrip("-").isdigit():
            continue
        name = _read(os.path.join(d, "type")) or os.path.basename(d)
        if name in zones:
            name = "%s.%s" % (name, os.path.basename(d))
        zones[name] = int(t) / 1000.0
    return zones or None


# --- Raspberry Pi ---------------------------------------------------------------------------
THROTTLE_BITS = {
    0: "under_voltage", 1: "arm_freq_capped", 2: "throttled", 3: "soft_temp_limit",
    16: "under_voltage_occurred", 17: "arm_freq_capped_occurred", 18: "throttled_occurred",
    19: "soft_temp_limit_occurred",
}


def parse_vcgencmd_throttled(text):
    """``throttled=0x50005`` -> {"raw": 0x50005, "flags": [...], "now": bool}."""
    m = re.search(r"throttled=(0x[0-9a-fA-F]+|\d+)", text or "")
    if not m:
        return None
    raw = int(m.group(1), 0)
    flags = [name for bit, name in sorted(THROTTLE_BITS.items()) if raw & (1 << bit)]
    return {"raw": raw, "flags": flags, "now": bool(raw & 0xF)}


def parse_vcgencmd_temp(text):
    m = re.search(r"temp=([-\d.]+)", text or "")
    return float(m.group(1)) if m else None


def parse_vcgencmd_clock(text):
    m = re.search(r"frequency\(\d+\)=(\d+)", text or "")
    return int(m.group(1)) / 1e6 if m else None


def read_rpi():
    throttled = _run(["vcgencmd", "get_throttled"])
    if throttled is None:
        return None
    return {
        "throttled": parse_vcgencmd_throttled(throttled),
        "temp_c": parse_vcgencmd_temp(_run(["vcgencmd", "measure_temp"])),
        "arm_mhz": parse_vcgencmd_clock(_run(["vcgencmd", "measure_clock", "arm"])),
    }


# --- NVIDIA Jetson --------------------------------------------------------------------------
def parse_nvpmodel(text):
    """``nvpmodel -q`` -> {"mode_name": "MAXN", "mode_id": 0}."""
    if not text:
        return None
    m = re.search(r"NV Power Mode:\s*(\S+)", text)
    ids = re.findall(r"^\s*(\d+)\s*$", text, re.M)
    if not m and not ids:
        return None
    return {"mode_name": m.group(1) if m else None, "mode_id": int(ids[-1]) if ids else None}


_FREQ = re.compile(r"(MinFreq|MaxFreq|CurrentFreq)=(\d+)")


def parse_jetson_clocks_show(text):
    """``jetson_clocks --show`` -> CPU/GPU/EMC min, max and current frequencies and whether
    the clocks are locked (every listed clock's current frequency at its maximum and its
    minimum raised to the maximum, as ``jetson_clocks`` leaves them)."""
    if not text:
        return None
    cpus, units = {}, {}
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"(cpu\d+):\s*Online=(\d)", line)
        if m:
            f = dict((k, int(v)) for k, v in _FREQ.findall(line))
            g = re.search(r"Governor=(\S+)", line)
            cpus[m.group(1)] = {"online": m.group(2) == "1", "governor": g.group(1) if g else None,
                                "min_hz": f.get("MinFreq"), "max_hz": f.get("MaxFreq"), "cur_hz": f.get("CurrentFreq")}
            continue
        m = re.match(r"(GPU|EMC|DLA\d_CORE|DLA\d_FALCON|PVA\d_VPS\d|PVA\d_AXI)\b:?", line)
        if m:
            f = dict((k, int(v)) for k, v in _FREQ.findall(line))
            if f:
                units[m.group(1)] = {"min_hz": f.get("MinFreq"), "max_hz": f.get("MaxFreq"), "cur_hz": f.get("CurrentFreq")}
    mode = re.search(r"NV Power Mode:\s*(\S+)", text)
    online = [c for c in cpus.values() if c["online"]]
    clocks = online + [units[k] for k in ("GPU", "EMC") if k in units]
    locked = bool(clocks) and all(c["min_hz"] == c["max_hz"] == c["cur_hz"] for c in clocks if c["max_hz"])
    return {"cpus": cpus, "units": units, "power_mode": mode.group(1) if mode else None, "clocks_locked": locked}


def read_jetson():
    if not (os.path.exists("/etc/nv_tegra_release") or shutil.which("nvpmodel")):
        return None
    out = {"nvpmodel": parse_nvpmodel(_run(["nvpmodel", "-q"])), "clocks": parse_jetson_clocks_show(_run(["jetson_clocks", "--show"]))}
    gpu = {}
    for d in glob.glob("/sys/class/devfreq/*"):
        name = os.path.basename(d)
        cur = _read(os.path.join(d, "cur_freq"))
        if cur and cur.isdigit() and ("gpu" in name or "gv11b" in name or "ga10b" in name or "gp10b" in name):
            gpu[name] = {"cur_mhz": int(cur) / 1e6, "max_mhz": int(_read(os.path.join(d, "max_freq")) or 0) / 1e6}
    out["gpu_devfreq"] = gpu or None
    return out


# --- one snapshot, and what changed between two ---------------------------------------------
def snapshot():
    load = _read("/proc/loadavg")
    return {
        "time": time.time(),
        "cpu": read_cpus(),
        "thermal_c": read_thermal(),
        "rpi": read_rpi(),
        "jetson": read_jetson(),
        "loadavg_1m": float(load.split()[0]) if load else None,
    }


def throttle_reasons(before, after):
    """Why a cell's clocks can't be trusted: throttle bits set or newly raised, or a CPU
    frequency cap lowered during the cell. Empty when nothing is known to have changed."""
    reasons = []
    rb, ra = (before or {}).get("rpi"), (after or {}).get("rpi")
    if ra and ra.get("throttled"):
        t = ra["throttled"]
        if t["now"]:
            reasons.append("vcgencmd throttled now: %s" % ",".join(f for f in t["flags"] if not f.endswith("occurred")))
        tb = (rb or {}).get("throttled") or {"raw": 0}
        if (t["raw"] >> 16) & ~(tb["raw"] >> 16):
            reasons.append("vcgencmd throttling occurred during the cell")
    cb, ca = (before or {}).get("cpu") or {}, (after or {}).get("cpu") or {}
    for name, a in ca.items():
        b = cb.get(name)
        if b and b.get("max_mhz") and a.get("max_mhz") and a["max_mhz"] < b["max_mhz"]:
            reasons.append("%s frequency cap fell %.0f -> %.0f MHz" % (name, b["max_mhz"], a["max_mhz"]))
    jb = ((before or {}).get("jetson") or {}).get("clocks") or {}
    ja = ((after or {}).get("jetson") or {}).get("clocks") or {}
    if jb.get("clocks_locked") and ja and not ja.get("clocks_locked"):
        reasons.append("Jetson clocks were unlocked during the cell")
    return reasons
