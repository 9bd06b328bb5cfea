"""The PyTorch reference (fedgfe), for users coming from it: its config files read and translated
(``config.py``), and its training loop re-written in torch as the baseline of the scaling study
(``torch_baseline.py``). Its node files are read by ``a2v_jax.data.reference_nodes``."""
