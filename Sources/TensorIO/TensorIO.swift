// TensorIO — tensors in files: safetensors read (mmap, every header field checked) and written,
// MoE case files in Hugging Face checkpoint naming, and the layer protocol the reference reads.
//
// - `DType`: the safetensors element types; `Tensor` views bytes of one dtype.
// - `WeightFormat`: how a layer's projection weights are stored; `.dtype` is its safetensors
//   dtype (the one mapping to safetensors' strings), `.fp8` its LowPrecision format, `.tag` its
//   short name in case names.
// - `MoECaseFile`: a layer cut from a checkpoint; `CaseFileReader` holds one function per
//   validation step. Every problem is a `TensorIOError` naming the file and the tensor.
// - `MoELayerSource`: what the reference needs from a layer (case file or synthetic).
