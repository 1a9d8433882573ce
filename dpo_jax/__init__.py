"""dpo_jax: Direct Preference Optimization in JAX."""
