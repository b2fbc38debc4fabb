from tests.diffusion.conftest import single_thread  # noqa: F401  (tiny tensors: one thread is faster)
