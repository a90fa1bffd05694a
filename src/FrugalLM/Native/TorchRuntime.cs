using System.Runtime.InteropServices;
using TorchSharp;

namespace FrugalLM.Native;

/// <summary>
/// Process-wide set-up of the tensor engine: loads libtorch, tunes glibc's allocator so freed tensors go
/// back to the operating system, and sets the thread count. Call once before any tensor work; later calls
/// are no-ops.
/// </summary>
public static class TorchRuntime
{
    private const int MallocMmapThreshold = -3; // M_MMAP_THRESHOLD in glibc's malloc.h
    private const int MmapThresholdBytes = 128 << 10;
    private static readonly Lock Gate = new();
    private static bool initialized;

    /// <summary>The threads libtorch uses for intra-op parallelism after <see cref="Initialize"/>.</summary>
    public static int Threads => torch.get_num_threads();

    /// <summary>Loads libtorch and applies the process-wide settings.</summary>
    /// <param name="threads">Intra-op threads; null keeps libtorch's default (one per core).</param>
    public static void Initialize(int? threads = null)
    {
        lock (Gate)
        {
            if (!initialized)
            {
                // Without this, glibc serves large blocks from its heap and keeps them resident after
                // libtorch frees them, so a process's footprint only ever grows (measured: 506 -> 867 MiB
                // over 60 steps). Allocations of 256 KiB and more become private mmaps, unmapped on free. At 1 MiB, the
                // activations of small batches (one 256-token sequence of a 768-wide model: 768 KiB a tensor) stayed in
                // the heap, whose freed holes stay resident: llama-100m at 1 x 256 peaked 190-260 MiB higher (fp32,
                // 2526/2583 against 2340/2321 MiB; LoRA 1112 against 985), at no measured cost in speed. At 256 KiB the
                // 192 KiB activations of a 64-token step of a 1536-wide bf16 model stayed in the heap, and libtorch's
                // 64-byte-aligned requests could not reuse their freed chunks (101 free chunks of 181-197 KiB, 19 MiB, after
                // one disk-offloaded forward; glibc's malloc_info): 128 KiB keeps 2.5-8 MiB free instead of 22-29.
                // Requests below it (a decoding step's tensors) stay in the heap, where they are cheap.
                // An explicit MALLOC_MMAP_THRESHOLD_ from the user wins (glibc has already applied it).
                if (OperatingSystem.IsLinux() && Environment.GetEnvironmentVariable("MALLOC_MMAP_THRESHOLD_") is null)
                {
                    _ = mallopt(MallocMmapThreshold, MmapThresholdBytes);
                }
                // libtorch's OpenMP workers spin after every parallel op, waiting for the next. The int8
                // kernels run between libtorch ops on .NET threads, which then fight the spinners for the
                // cores (measured on 2 cores: a 1-token 4096x4096 int8 projection 0.4 ms alone, 2.9 ms right
                // after a libtorch matmul; one decoder layer of int8 projections 36-60 ms, 17-24 ms passive).
                // Passive waiting must be chosen before libgomp loads; the user's own setting wins.
                if (OperatingSystem.IsLinux() && Environment.GetEnvironmentVariable("OMP_WAIT_POLICY") is null)
                {
                    _ = setenv("OMP_WAIT_POLICY", "PASSIVE", 0);
                }
                try
                {
                    torch.InitializeDeviceType(DeviceType.CPU);
                }
                catch (Exception e) when (e is not OutOfMemoryException)
                {
                    throw new InvalidOperationException(
                        "libtorch could not be loaded. Build with 'dotnet build' so the TorchSharp native glue is " +
                        "prepared for this system's libstdc++ (see build/WeakenGlibcxxRequirement.cs). " + e.Message, e);
                }
                // Before the first matrix product: oneMKL caches its choice of kernels.
                MklDispatch.Apply();
                initialized = true;
            }
            if (threads is int n)
            {
                torch.set_num_threads(Math.Max(1, n));
            }
        }
    }

    /// <summary>
    /// Runs each kind of kernel a model uses once, on tiny tensors, in fp32, bf16 and fp16, forward and backward:
    /// matrix products, scaled-dot-product attention (causal and not), softmax and cross-entropy, embedding
    /// lookups, norms and activations. The first call of a kernel maps its code pages and starts libtorch's thread
    /// pools (measured: 30-50 MiB of resident memory, the same for a 17M and a 100M model), which is the runtime's
    /// memory, not the model's: a baseline measured after this warm-up is the runtime a plan runs on.
    /// </summary>
    public static void WarmUpKernels()
    {
        using var scope = torch.NewDisposeScope();
        using var grad = torch.enable_grad(); // callers may be under no_grad (inference); backward kernels count too
        foreach (var dtype in new[] { torch.ScalarType.Float32, torch.ScalarType.BFloat16, torch.ScalarType.Float16 })
        {
            var ids = torch.randint(0, 16, [2, 8], dtype: torch.ScalarType.Int64);
            var table = torch.randn([16, 32], dtype: dtype).requires_grad_(true);
            var weight = torch.randn([32, 32], dtype: dtype).requires_grad_(true);
            var x = table.index_select(0, ids.reshape(-1)).reshape(2, 8, 32);
            var normed = x * torch.rsqrt(x.to(torch.ScalarType.Float32).pow(2).mean([-1L], keepdim: true) + 1e-5).to(dtype);
            var h = torch.nn.functional.silu(torch.nn.functional.linear(normed, weight)) * torch.nn.functional.relu(normed);
            var q = h.reshape(2, 8, 4, 8).transpose(1, 2);
            var attended = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_casual: true)
                + torch.nn.functional.scaled_dot_product_attention(q, q, q, is_casual: false);
            var logits = torch.nn.functional.linear(attended.transpose(1, 2).reshape(16, 32), table).to(torch.ScalarType.Float32);
            var loss = torch.nn.functional.cross_entropy(logits.log_softmax(-1), ids.reshape(-1));
            loss.backward();
        }
        WarmUpGemmBuffers();
        SettleManagedHeap();
    }

    // oneMKL keeps the panels it packs a product's operands into (its "fast memory manager") and reuses them for every
    // later product. The tiny products above never fill them; these, of a decoder layer's size in every operand layout
    // and in bf16, fill what layer-sized products need (measured: +4.5 MiB in the baseline), so the baseline holds that
    // part as the runtime's. What a model's larger products add (the LM head's: 16-39 MiB, growing with its shape) is
    // the estimator's gemm_workspace.
    private static void WarmUpGemmBuffers()
    {
        using var scope = torch.NewDisposeScope();
        using var noGrad = torch.no_grad();
        foreach (var dtype in new[] { torch.ScalarType.Float32, torch.ScalarType.BFloat16 })
        {
            var a = torch.randn([1024, 1024], dtype: dtype);
            var b = torch.randn([1024, 2048], dtype: dtype);
            _ = a.matmul(b);
            _ = a.t().matmul(b);
            _ = b.t().matmul(a.t());
        }
    }

    // The .NET GC commits its generation-0 allocation budget (tens of MiB, sized from the CPU's cache) as a program
    // allocates, and keeps it. A baseline measured right after start-up, when little of it has been used, misses it, and
    // a run's peak then shows it as memory of the model (measured: 7.5 MiB committed at the baseline, 38.6 MiB at the
    // first training step of a disk-offloaded LoRA run of a 1.56 GB model). Short-lived allocations until one
    // generation-0 collection has run use the budget once, so the baseline holds it. A run that allocates little
    // managed memory (generating with a small model) then peaks 4-10 MiB under its estimate: the safe side.
    private static void SettleManagedHeap()
    {
        int collections = GC.CollectionCount(0);
        for (int i = 0; i < 100_000 && GC.CollectionCount(0) == collections; i++)
        {
            GC.KeepAlive(new byte[16 << 10]);
        }
    }

    [DllImport("libc", EntryPoint = "mallopt")]
    private static extern int mallopt(int param, int value);

    [DllImport("libc", EntryPoint = "setenv", CharSet = CharSet.Ansi, BestFitMapping = false, ThrowOnUnmappableChar = true)]
    private static extern int setenv(string name, string value, int overwrite);
}
