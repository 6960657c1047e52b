"""Built-in tiny demo: offline datasets and a small pretrained base that `qlora` can fine-tune on CPU."""
