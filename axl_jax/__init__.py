"""axl-jax: a JAX/Flax training stack for multilingual dense passage retrieval (AXL-ICT)."""
