"""The app's plan edits (plan.py + bank.py): options and the allocation label survive edit, save, load."""

import numpy as np
from tiny import tiny_model

from sigmascale_core.bank import SpectraBank
from sigmascale_core.models import target_matrices
from sigmascale_core.plan import CompressionPlan
from sigmascale_core.surgery import target_shapes


def test_edits_keep_options_and_labels_and_dense_has_one_encoding():
    model = tiny_model()
    shapes = target_shapes(model)
    bank = SpectraBank(target_matrices(model), 1000)
    plan = CompressionPlan.uniform(shapes, 0.75, "sigmascale", "fp", {"steps": 60, "lr": 0.02})
    ranks = bank.rank_array(plan)
    ranks[0] = bank.full_rank[0] - 1  # past break-even for a 64×64 matrix: dense
    ranks[1] = 5
    edited = plan.edited(bank.plan_ranks(ranks), "greedy", 0.5)
    assert edited.options == {"steps": 60, "lr": 0.02} and edited.allocation == "greedy"
    assert edited.target_retention == 0.5
    names = list(shapes)
    assert edited.matrices[names[0]].rank is None and edited.matrices[names[1]].rank == 5
    again = CompressionPlan.from_dict(edited.to_dict())
    assert again == edited
    np.testing.assert_array_equal(bank.rank_array(again), bank.normalise(ranks))
    # a method switch keeps the options the new method takes, drops the others
    assert edited.with_method("asvd").options == {}
    assert edited.with_method("svdllm").with_method("sigmascale").options == {}
    assert CompressionPlan.uniform(shapes, 0.75, "asvd", "fp", {"alpha": 0.3}).with_method(
        "sigmascale"
    ).options == {"alpha": 0.3}
