"""The language-model driver built on lstm_ext.LSTM: data, model, training, evaluation and
generation."""
