r"""The theory of "Understanding Deep Contrastive Learning via Coordinate-wise Optimization"
(Tian, NeurIPS 2022), made executable in float64, one subject per module:

    geometry     pair geometry: views, partners, J_i, d2, margins; E_α and C_α (Eqn. 5)
    phi_psi      the φ-ψ family (Eqn. 1), its pair importance α (Eqn. 4) and presets (Theorem 1)
    min_player   α = argmin E_α − R(α): entropy (Theorem 2) and the exact r_γ argmin (Sec. 6)
    deep_linear  deep linear nets with fixed α (Sec. 4: Lemma 1, Theorem 3, Corollary 3)
    relu         two-layer ReLU nets on the orthogonal mixture (Sec. 5: Theorems 4–6)

Everything is dense, O(M²) memory, for small exact experiments; the fast losses are
fastalpha.alpha_cl_loss. docs/theory.md says which statement is checked by which test, and
which statements are this project's own propositions rather than the paper's.
"""
from .deep_linear import *  # noqa: F401,F403
from .deep_linear import __all__ as _deep_linear
from .geometry import *  # noqa: F401,F403
from .geometry import __all__ as _geometry
from .min_player import *  # noqa: F401,F403
from .min_player import __all__ as _min_player
from .phi_psi import *  # noqa: F401,F403
from .phi_psi import __all__ as _phi_psi
from .relu import *  # noqa: F401,F403
from .relu import __all__ as _relu

__all__ = [*_geometry, *_phi_psi, *_min_player, *_deep_linear, *_relu]
