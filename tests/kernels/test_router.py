"""kernels/router.py: the route kernel against the PyTorch router (reference.route), and the
quantized expert gate/up gemv that routes in its programs against the route kernel and the gemv, and the
MoE input's sum, norm and logits in one kernel against the PyTorch ops."""
from kernel_checks import kernel_tests

test_router_in_triton_interpreter, test_router_on_cuda = kernel_tests('check_route', 'check_routed_gate_up',
                                                                   'check_add_norm_logits')
