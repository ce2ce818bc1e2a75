// protox compiles the .proto in pure Rust, so a fresh machine needs no `protoc` to build plinth.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=csi.proto");
    println!("cargo:rerun-if-changed=pluginregistration.proto");
    println!("cargo:rerun-if-changed=plinth.proto");
    let descriptors = protox::compile(["csi.proto", "pluginregistration.proto", "plinth.proto"], ["."])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(descriptors)?;
    Ok(())
}
