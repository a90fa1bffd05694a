namespace FrugalLM.Distributed;

/// <summary>
/// Chooses the collectives backend for this process. There is no NCCL (GPU) backend yet: FrugalLM runs on
/// libtorch CPU and Debian has no NCCL; one would implement <see cref="ICollectives"/> over <c>libnccl.so.2</c>
/// with its unique id exchanged through <see cref="MpiCollectives.Broadcast"/>.
/// </summary>
public static class Collectives
{
    /// <summary>
    /// <see cref="MpiCollectives"/> when this process was started by OpenMPI's <c>mpirun</c> (which sets
    /// <c>OMPI_COMM_WORLD_SIZE</c>), otherwise <see cref="SingleProcessCollectives"/>.
    /// </summary>
    public static ICollectives Create() =>
        LaunchedByMpirun ? MpiCollectives.Initialize() : new SingleProcessCollectives();

    /// <summary>True when OpenMPI's launcher started this process.</summary>
    public static bool LaunchedByMpirun => Environment.GetEnvironmentVariable("OMPI_COMM_WORLD_SIZE") is not null;
}
