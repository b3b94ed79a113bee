// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "MoECheck",
    products: [
        .executable(name: "moecheck", targets: ["moecheck"]),
        .library(name: "MoEVerify", targets: ["MoEVerify"]),
        .library(name: "MoEReference", targets: ["MoEReference"]),
        .library(name: "TensorIO", targets: ["TensorIO"]),
        .library(name: "LowPrecision", targets: ["LowPrecision"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        // OpenBLAS's cblas interface (Debian: libopenblas-dev), found through pkg-config.
        .systemLibrary(
            name: "COpenBLAS",
            pkgConfig: "openblas",
            providers: [.apt(["libopenblas-dev"])]
        ),
        .target(name: "LowPrecision"),
        .target(name: "TensorIO", dependencies: ["LowPrecision"]),
        // The float32 mode's fused bf16-weight GEMM (AVX-512 / AVX2, chosen at run time).
        .target(name: "CFastGEMM"),
        .target(name: "MoEReference", dependencies: ["LowPrecision", "TensorIO", "COpenBLAS", "CFastGEMM"]),
        .target(name: "CMoEKernelABI"),
        .target(name: "KernelBridge", dependencies: ["CMoEKernelABI"]),
        .target(name: "MoEVerify", dependencies: ["LowPrecision", "TensorIO", "MoEReference", "KernelBridge", "CMoEKernelABI"]),
        .executableTarget(
            name: "moecheck",
            dependencies: [
                "MoEVerify", "MoEReference", "TensorIO", "KernelBridge",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .executableTarget(name: "lowprecision-bench", dependencies: ["LowPrecision"]),
        // Shared by every test target: the seeded generator, expect helpers, scratch files, tags and
        // the MOECHECK_LONG_TESTS switch (see its TestSupport.swift).
        .target(name: "MoECheckTestSupport", dependencies: ["LowPrecision"], path: "Tests/MoECheckTestSupport"),
        .testTarget(name: "LowPrecisionTests", dependencies: ["LowPrecision", "MoECheckTestSupport"]),
        .testTarget(name: "TensorIOTests", dependencies: ["TensorIO", "LowPrecision", "MoECheckTestSupport"]),
        .testTarget(name: "MoEReferenceTests", dependencies: ["MoEReference", "TensorIO", "LowPrecision", "CFastGEMM", "COpenBLAS", "MoECheckTestSupport"]),
        .testTarget(name: "KernelBridgeTests", dependencies: ["KernelBridge", "CMoEKernelABI", "MoECheckTestSupport"]),
        .testTarget(name: "MoEVerifyTests", dependencies: ["MoEVerify", "MoEReference", "TensorIO", "KernelBridge", "MoECheckTestSupport"]),
    ],
    swiftLanguageModes: [.v5]
)
