"""The recurrent head learns left/right order; global average pooling cannot."""

from cnn_rnn_perception.proof import accuracy, fit, PairModel, shape_pairs
import torch


def test_recurrent_head_separates_shape_order_where_pooling_cannot():
    data = shape_pairs(32, seed=0)
    assert 0 < int(data[2].sum()) < 32  # both orders present
    recurrent = PairModel('columns', hidden_size=16)
    fit(recurrent, data, epochs=15, batch_size=16)
    assert accuracy(recurrent, data) == 1.0
    pooled = PairModel('gap')
    fit(pooled, data, epochs=15, batch_size=16)
    # Both orders give the pooled head the same input, so it answers one way for both.
    with torch.no_grad():
        pooled.eval()
        logits = pooled(*data[:2])
    assert torch.allclose(logits[data[2] == 0][0], logits[data[2] == 1][0], atol=1e-5)
    share = float(data[2].float().mean())  # one constant answer scores this or 1 - this
    assert min(abs(accuracy(pooled, data) - share),
               abs(accuracy(pooled, data) - (1 - share))) < 1e-6
