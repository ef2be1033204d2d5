"""models._gguf_parsed_once: one parse of a GGUF file serves every reader transformers asks for while
converting, and gguf-py is left as it was afterwards (also after an error)."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from unlearn.models import _gguf_parsed_once  # noqa: E402


def tiny_gguf(path):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_token_list(["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_one_reader_and_one_name_map_while_converting_then_the_originals(tmp_path):
    path = tiny_gguf(tmp_path / "tiny.gguf")
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(path) is first
        assert [t.name for t in first.tensors] == ["token_embd.weight"]
        np.testing.assert_array_equal(first.tensors[0].data, np.arange(12, dtype=np.float32).reshape(3, 4))
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert gguf.GGUFReader is reader_class and gguf.get_tensor_name_map is name_map
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)


def test_the_originals_come_back_after_an_error(tmp_path):
    reader_class = gguf.GGUFReader
    with pytest.raises(RuntimeError), _gguf_parsed_once():
        assert gguf.GGUFReader is not reader_class
        raise RuntimeError("conversion failed")
    assert gguf.GGUFReader is reader_class
