//! Embedded CUDA kernels. With the `cuda` feature the build script compiles `kernels/*.cu` with nvcc
//! into cubins per architecture plus PTX; without it this crate is empty.
