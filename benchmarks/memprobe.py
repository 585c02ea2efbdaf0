"""Fresh-process CPU memory probe: ``python -m benchmarks.memprobe CASE_JSON IMPL THREADS``.

Imports torch, builds the case's inputs, runs the op once as a warm-up (compilation,
lazily created thread pools and library state are not the op's memory) and frees its
results, resets the peak RSS to the current RSS (``/proc/self/clear_refs``), reads VmHWM,
runs the op once more and reads VmHWM again. Prints ``{"growth": bytes, "reset": bool}``.
Where the peak cannot be reset, the warm-up is skipped (except for ``compile``, whose first
call compiles) and the growth is taken from the high-water mark after building the inputs.
"""
import gc
import json
import sys


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main() -> None:
    case_json, impl, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    import torch

    from benchmarks import cases
    torch.set_num_threads(threads)
    case = cases.Case(**json.loads(case_json))
    x = cases.make_inputs(case, "cpu")
    fn = cases.runner(case, impl, x)
    can_reset = reset_peak()
    if can_reset or impl == "compile":
        out = fn()
        del out
        for t in x.values():
            t.grad = None
        gc.collect()
        reset_peak()
    before = vm_hwm()
    out = fn()
    after = vm_hwm()
    # VmHWM is max(recorded peak, current RSS) and the kernel records the peak lazily, so
    # when RSS shrinks during the call `after` can fall a few pages below `before`: no
    # growth to measure, not negative memory.
    print(json.dumps({"growth": max(0, after - before), "reset": can_reset}))


if __name__ == "__main__":
    main()
