"""Contract checks for plugin authors: call them from your own tests.

```python
from jei.testing import check_backbone, check_gate, check_im

def test_my_backbone_keeps_the_contract():
    check_backbone(MyNet(num_classes=10), torch.randn(4, 3, 32, 32))
```

Each check raises ``AssertionError`` with a message naming the broken rule. The module needs
only torch (no pytest, no Hypothesis) and is never imported by library code.
"""

from jei.testing.contracts import (
    check_backbone,
    check_exit_specs,
    check_gate,
    check_im,
    check_representation,
    check_select_keeps_rows,
)

__all__ = [
    "check_backbone",
    "check_exit_specs",
    "check_gate",
    "check_im",
    "check_representation",
    "check_select_keeps_rows",
]
