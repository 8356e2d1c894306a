"""A real Hugging Face `transformers` model trained by fastcb on dict batches (skipped when transformers is missing)."""
import pytest, torch
from torch.utils.data import DataLoader, Dataset
transformers = pytest.importorskip('transformers')
from fastcb.all import Learner, DataLoaders, CheckpointCallback

class Tokens(Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 20, (n, 12), generator=g)
        self.labels = (self.ids == 3).any(1).long()
    def __len__(self): return len(self.ids)
    def __getitem__(self, i): return {'input_ids': self.ids[i], 'labels': self.labels[i]}

def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=20, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16, num_labels=2)
    return transformers.BertForSequenceClassification(cfg)

def accuracy(pred, targ): return (pred.argmax(-1) == targ).float().mean()

def test_bert_fit_preds_resume(tmp_path):
    dls = DataLoaders(DataLoader(Tokens(512, 0), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(1)),
                      DataLoader(Tokens(128, 1), batch_size=64), device='cpu')
    learn = Learner(dls, bert(), opt_func=torch.optim.AdamW, lr=5e-3, metrics=accuracy, path=tmp_path)
    learn.fit(3, cbs=CheckpointCallback(every_epoch=True))
    assert learn.recorder.values[-1][-1] > 0.9, learn.recorder.values
    logits, labels = learn.get_preds(dl=DataLoader(Tokens(128, 1), batch_size=32, shuffle=True))
    assert logits.shape == (128, 2) and torch.equal(labels, dls.valid.dataset.labels)
    # resume a fresh learner from the last checkpoint: same weights
    again = Learner(dls, bert(), opt_func=torch.optim.AdamW, lr=5e-3, metrics=accuracy, path=tmp_path,
                    cbs=CheckpointCallback(every_epoch=True))
    again.fit(3, resume='latest')
    for a, b in zip(learn.model.parameters(), again.model.parameters()): assert torch.equal(a, b)
