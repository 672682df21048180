"""What the launchers know of the device they plan their grids for."""
import torch


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``, which the launchers plan their grids by. Other devices
    (CPU tensors under the interpreter, meta tensors in ``tools.triton_build``) plan as an H100
    (132 SMs), so that they take the paths an H100 would."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132
