"""tl.associative_scan in Triton's interpreter, a position along the scan axis at a time.

The interpreter runs a scan with a user combine function (the diagonal and block-diagonal scans' affine-map
composition) one element at a time: a [64, 32] tile costs 2,048 interpreted combine calls, which made those
kernels' tests most of the suite's time. `scan_along_axis` calls the combine once per position along the axis
on every other element at once: the same combines in the same order for every element, so the same results
bit for bit (tests/kernels/test_interpreter_scan.py checks it against the interpreter's own scan).
"""
import numpy as np


def scan_along_axis(self, input):
    """A drop-in for triton.runtime.interpreter.ScanOps.generic_scan (`self` is the ScanOps)."""
    data = [arg.handle.data for arg in input]
    outputs = [np.zeros_like(d) for d in data]
    accumulated = None
    for position in range(data[0].shape[self.axis]):
        current = tuple(self.to_tensor(np.take(d, position, axis=self.axis), arg.dtype)
                        for d, arg in zip(data, input))
        if accumulated is None:
            accumulated = current
        else:
            combined = self.combine_fn.fn(*accumulated, *current)
            accumulated = combined if isinstance(combined, tuple) else (combined,)
        index = (slice(None),) * self.axis + (position,)
        for output, value in zip(outputs, accumulated):
            output[index] = value.handle.data if hasattr(value, "handle") else value
        # carried on in the inputs' dtypes, as the interpreter does (it reads its running values back)
        accumulated = tuple(self.to_tensor(output[index], arg.dtype) for output, arg in zip(outputs, input))
    return [self.to_tensor(output, arg.dtype) for output, arg in zip(outputs, input)]


def install() -> None:
    """Make the interpreter's scans use scan_along_axis (with TRITON_INTERPRET=1); Triton's own stays at
    ScanOps.element_by_element for the test that compares the two."""
    from triton.runtime.interpreter import ScanOps

    if ScanOps.generic_scan is not scan_along_axis:
        ScanOps.element_by_element = ScanOps.generic_scan
        ScanOps.generic_scan = scan_along_axis
