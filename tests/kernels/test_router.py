"""kernels/router.py (the fused router) against the PyTorch router (reference.route)."""
from kernel_checks import kernel_tests

test_router_in_triton_interpreter, test_router_on_cuda = kernel_tests('check_route')
