"""Policy: who may call which model with what (issue 4).

Free of HTTP and SQL by design. Until the policy document lands, the gateway
enforces roles only (gateway/calls.py: INFERENCE_ROLES), and every routable
model is open to every `user` and `admin` key.
"""
