//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so building
//! the project needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "../../proto/resonance/mq/v1/push_event.proto",
        "../../proto/resonance/mq/v1/offline_notice.proto",
        "../../proto/resonance/gateway/v1/push.proto",
    ];
    let descriptors = protox::compile(protos, ["../../proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
