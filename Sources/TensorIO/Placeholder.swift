// module TensorIO
